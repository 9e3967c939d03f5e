"""Constrained decoding for the transformers engine, with xgrammar.

Why xgrammar (over lm-format-enforcer): it is the grammar backend vLLM itself uses by default, so a
schema means the same thing on both engines (same JSON grammar, same whitespace rule), its token masks
are precomputed per grammar (cheap per step on CPU), and it handles JSON schema, regex and EBNF
(choice lists) with one API. We compile with `any_whitespace=False`: JSON comes out in one canonical
compact layout (`{"a": 1, "b": [2, 3]}`), which matches vLLM run with `disable_any_whitespace=True`
and stops a weak model from spending its token budget on whitespace.

`GrammarLogitsProcessor` is our own small version of `xgrammar.contrib.hf.LogitsProcessor`: that one
asserts on every token, which breaks when transformers pads a row that already stopped (stop string
or EOS reached while another row still runs); ours tracks each row and simply leaves finished rows alone.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch
from transformers import LogitsProcessor

from recforge.generate.engine import Constraint


def clean_schema(schema: dict) -> dict:
    """Drop vendor keys (`x-...`) a grammar compiler may not accept."""
    if isinstance(schema, dict):
        return {k: clean_schema(v) for k, v in schema.items() if not str(k).startswith("x-")}
    if isinstance(schema, list):
        return [clean_schema(v) for v in schema]
    return schema


def choice_ebnf(choices) -> str:
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return f"root ::= {alternatives}"


class GrammarCache:
    """Compiles each distinct constraint once per tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info)
        self._cache: dict[str, object] = {}

    def compile(self, constraint: Constraint):
        key = constraint.key()
        if key not in self._cache:
            if constraint.kind == "json":
                grammar = self.compiler.compile_json_schema(json.dumps(clean_schema(constraint.value)), any_whitespace=False)
            elif constraint.kind == "regex":
                grammar = self.compiler.compile_regex(constraint.value)
            elif constraint.kind == "choice":
                grammar = self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(choice_ebnf(constraint.value)))
            else:
                raise ValueError(f"unknown constraint kind {constraint.kind!r}")
            self._cache[key] = grammar
        return self._cache[key]


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks each row's logits to the tokens its grammar allows next (rows without a grammar are untouched)."""

    def __init__(self, cache: GrammarCache, grammars: list, prompt_len: int):
        xgr = cache.xgr
        self.xgr = xgr
        self.vocab_size = cache.info.vocab_size
        self.prompt_len = prompt_len
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.active = [m is not None for m in self.matchers]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:  # a token was chosen since the last call: advance the matchers
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if self.active[i] and not m.is_terminated() and not m.accept_token(last[i]):
                    self.active[i] = False  # row already finished (padding) - nothing left to constrain
        rows = [i for i, m in enumerate(self.matchers) if self.active[i] and not m.is_terminated()]
        if not rows:
            return scores
        self.xgr.reset_token_bitmask(self.bitmask)
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        masked = scores[:, : self.vocab_size].float().clone()
        self.xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), indices=rows)
        out = scores.clone()
        out[:, : self.vocab_size] = masked.to(scores.dtype)
        return out


class SeededSampler(LogitsProcessor):
    """Per-row seeded sampling through the Gumbel-max trick, run under greedy `generate`.

    argmax(logits / T + Gumbel noise) is an exact sample from softmax(logits / T). Drawing the noise from
    one `torch.Generator` per row (seeded by that request's seed) makes a request's sample depend on its
    seed alone - not on which other requests share its batch or where it sits - which transformers'
    global-RNG sampling cannot give. Greedy rows (T = 0) are left as they are.
    """

    def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int]):
        self.temperatures = temperatures
        self.top_ps = top_ps
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s) % (2**63))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone().float()
        for i, t in enumerate(self.temperatures):
            if t <= 0:
                continue
            logits = out[i] / t
            if self.top_ps[i] < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
                drop = cum - torch.softmax(sorted_logits, dim=-1) >= self.top_ps[i]
                logits[order[drop]] = float("-inf")
            u = torch.rand(logits.shape, generator=self.generators[i]).clamp_(1e-20, 1.0)
            out[i] = logits - torch.log(-torch.log(u))
        return out.to(scores.dtype)


def truncate_at_stop(text: str, stops) -> tuple[str, bool]:
    """Cut `text` before the first stop string (vLLM's default: the stop string is not returned)."""
    cut = None
    for s in stops:
        if s and (pos := text.find(s)) >= 0 and (cut is None or pos < cut):
            cut = pos
    return (text, False) if cut is None else (text[:cut], True)


@lru_cache(maxsize=256)
def compiled_regex(pattern: str):
    return re.compile(pattern)
