"""The transformers engine: batched `generate` on CPU or GPU with the same contract as the vLLM engine.

What makes it fast enough to run a catalogue on CPU (see bench/generate_engine.py):
- identical (prompt, sampling, constraint) rows are generated once and copied to every request that asks;
- rows are sorted by prompt length and batched, so padding (left side, for decoder-only models) stays small;
- rows with different stop strings go in different batches (transformers applies stop strings per call),
  and each row is cut to its own `max_tokens` afterwards - generation is autoregressive, so the first k
  tokens of a longer run are exactly what a k-token run gives.
Determinism: greedy rows are plain argmax; sampled rows draw from one seeded generator per row
(`SeededSampler`), so a request's output depends on its seed, not on its batch neighbours.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from recforge.config import RecforgeError
from recforge.generate.engine import (
    Completion,
    Constraint,
    GenerationRequest,
    GenerationResult,
    check_unique_ids,
)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt. Prompts for a chat model come out of its chat template, which writes every
    special token the model expects (Llama-3's BOS is in its template, Qwen has none), so nothing is added:
    the same ids as `apply_chat_template(..., tokenize=True)` (how trl trains and vLLM's chat path runs).
    A base model without a chat template gets the tokenizer's usual special tokens."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def sample_seed(seed: int | None, index: int) -> int:
    """The seed of the `index`-th of n samples of one request (index 0 keeps the request's seed)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(6), "little")
    if index == 0:
        return seed
    return int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:12], 16)


@dataclass
class _Row:
    """One distinct sequence to generate."""

    ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int
    constraint: Constraint | None

    def key(self) -> tuple:
        seed = self.seed if self.temperature > 0 else None  # greedy ignores the seed
        ckey = self.constraint.key() if self.constraint else None
        return (tuple(self.ids), self.max_tokens, self.stop, self.temperature, self.top_p, seed, ckey)


class TransformersEngine:
    name = "transformers"

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        adapter: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 16,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        dedup: bool = True,
        sort_by_length: bool = True,
        cpu_threads: int | None = None,
    ):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        # Small models on CPU: intra-op threads can cost more in synchronisation than they give
        # (measured 16x slower per linear layer with 2 threads than 1 on a busy 2-core machine).
        # Applied only inside generate(), so the process's own setting is left as it was.
        self.cpu_threads = cpu_threads
        self.version = transformers.__version__
        self.batch_size = batch_size
        self.dedup = dedup
        self.sort_by_length = sort_by_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # An adapter saved with its own tokenizer (added tokens, chat template) must be served with that tokenizer.
        from pathlib import Path

        tok_src, tok_rev = model, revision
        if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
            tok_src, tok_rev = adapter, None
        self.tokenizer = AutoTokenizer.from_pretrained(tok_src, revision=tok_rev, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.to(self.device).eval()
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.stop_token_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_token_ids[0]
        config = self.model.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        self.vocab_size = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        self._grammars = None

    # -------------------------------------------------------------- helpers shared with the runner
    def render_chat(self, messages: list[dict]) -> str:
        from recforge.prompts import render_chat

        return render_chat(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text))

    @property
    def grammars(self):
        if self._grammars is None:
            from recforge.generate.constraints import GrammarCache

            self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._grammars

    # -------------------------------------------------------------- the contract
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not self.cpu_threads:
            return self._generate(requests)
        previous = self.torch.get_num_threads()
        self.torch.set_num_threads(self.cpu_threads)
        try:
            return self._generate(requests)
        finally:
            self.torch.set_num_threads(previous)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        check_unique_ids(requests)
        results = [GenerationResult(r.request_id) for r in requests]
        rows: dict[tuple, _Row] = {}
        wanted: list[list[tuple]] = [[] for _ in requests]  # per request: the row keys of its n samples
        for i, req in enumerate(requests):
            try:
                ids = encode_prompt(self.tokenizer, req.prompt)
                results[i].prompt_tokens = len(ids)
                budget = self.max_model_len - req.sampling.max_tokens
                if len(ids) > budget:
                    raise ValueError(
                        f"prompt_too_long: {len(ids)} prompt tokens + max_tokens {req.sampling.max_tokens} "
                        f"> max_model_len {self.max_model_len}"
                    )
                if req.constraint is not None:
                    self.grammars.compile(req.constraint)  # a bad schema/regex is this row's error
            except Exception as err:  # noqa: BLE001 - confined to this request
                results[i].error = str(err) if str(err).startswith("prompt_too_long") else f"{type(err).__name__}: {err}"
                continue
            s = req.sampling
            n_distinct = 1 if s.greedy else s.n  # n greedy samples are n copies of one
            for k in range(n_distinct):
                row = _Row(ids, s.max_tokens, tuple(s.stop), s.temperature, s.top_p, sample_seed(s.seed, k), req.constraint)
                key = row.key() if self.dedup else (i, k)
                rows.setdefault(key, row)
                wanted[i].append(key)
        outputs = self._run_rows(rows)
        for i, req in enumerate(requests):
            if results[i].error is not None:
                continue
            errors = [outputs[k] for k in wanted[i] if isinstance(outputs[k], str)]
            if errors:
                results[i].error = errors[0]
                continue
            samples = [outputs[k] for k in wanted[i]]
            if len(samples) < req.sampling.n:
                samples = samples * req.sampling.n
            results[i].completions = [Completion(c.text, c.finish_reason, c.num_tokens, c.token_ids) for c in samples]
        return results

    def _run_rows(self, rows: dict[tuple, _Row]) -> dict[tuple, Completion | str]:
        """Group by stop strings, sort by length, batch; a failing batch is retried row by row."""
        out: dict[tuple, Completion | str] = {}
        groups: dict[tuple, list[tuple]] = {}
        for key, row in rows.items():
            groups.setdefault(row.stop, []).append(key)
        for stop, keys in groups.items():
            if self.sort_by_length:
                keys = sorted(keys, key=lambda k: (len(rows[k].ids), rows[k].max_tokens))
            for start in range(0, len(keys), self.batch_size):
                batch = keys[start : start + self.batch_size]
                try:
                    done = self._generate_batch([rows[k] for k in batch])
                except Exception:  # noqa: BLE001 - isolate the row that fails
                    done = []
                    for k in batch:
                        try:
                            done.append(self._generate_batch([rows[k]])[0])
                        except Exception as err:  # noqa: BLE001
                            done.append(f"engine_error: {type(err).__name__}: {err}")
                out.update(zip(batch, done))
        return out

    def _generate_batch(self, batch: list[_Row]) -> list[Completion]:
        torch = self.torch
        from transformers import GenerationConfig, LogitsProcessorList

        from recforge.generate.constraints import GrammarLogitsProcessor, SeededSampler, truncate_at_stop

        width = max(len(r.ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - len(r.ids) :] = torch.tensor(r.ids)
            attention[i, width - len(r.ids) :] = 1
        processors = LogitsProcessorList()
        if any(r.constraint is not None for r in batch):
            grammars = [self.grammars.compile(r.constraint) if r.constraint else None for r in batch]
            processors.append(GrammarLogitsProcessor(self.grammars, grammars, width))
        if any(r.temperature > 0 for r in batch):
            # Runs after the grammar mask: masked tokens stay at -inf whatever the noise.
            processors.append(SeededSampler([r.temperature for r in batch], [r.top_p for r in batch], [r.seed for r in batch]))
        stop = list(batch[0].stop) or None
        gen_cfg = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in batch),
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_id,
            stop_strings=stop,
        )
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=gen_cfg,
                logits_processor=processors,
                tokenizer=self.tokenizer if stop else None,
            )
        completions = []
        stop_ids = set(self.stop_token_ids)
        for i, r in enumerate(batch):
            new = seqs[i, width:].tolist()[: r.max_tokens]
            finish, keep = "length", new
            for j, t in enumerate(new):
                if t in stop_ids:
                    finish, keep = "stop", new[: j + 1]
                    break
            while keep and keep[-1] == self.pad_id and self.pad_id not in stop_ids:
                keep = keep[:-1]
            text = self.tokenizer.decode([t for t in keep if t not in stop_ids], skip_special_tokens=True)
            text, hit = truncate_at_stop(text, r.stop)
            if hit:
                finish = "stop"
            elif finish == "length" and len(keep) < r.max_tokens:
                finish = "stop"  # the batch ended this row early (a stop string spanning the cut)
            completions.append(Completion(text, finish, len(keep), keep))
        return completions


def load_error(model: str, err: Exception) -> RecforgeError:
    return RecforgeError(f"could not load model {model!r}: {type(err).__name__}: {err}")
