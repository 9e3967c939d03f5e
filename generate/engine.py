"""One interface for every generation engine: requests with stable ids in, results in the same order out.

`TransformersEngine` (CPU or GPU, batched `generate`) and `VLLMEngine` (offline `vllm.LLM`) both take a
list of `GenerationRequest` and return one `GenerationResult` per request, in request order. A request
that cannot run (a prompt over the token budget, an engine error confined to that row) comes back
with `error` set instead of failing the whole call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from recforge.config import RecforgeError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. `max_tokens` is always explicit (vLLM's default of 16 truncates)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """An output constraint enforced while decoding: a JSON schema, a choice list or a regex."""

    kind: Literal["json", "choice", "regex"]
    value: Any  # dict (schema) | tuple[str, ...] (choices) | str (regex)

    def key(self) -> str:
        return self.kind + ":" + json.dumps(self.value, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str  # the full prompt text (already through the chat template)
    sampling: Sampling
    constraint: Constraint | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS, stop string or constraint complete) | "length" (max_tokens)
    num_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the generated ids (EOS included when it ended the row)


@dataclass
class GenerationResult:
    request_id: str
    completions: list[Completion] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache (vLLM; 0 elsewhere)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(Protocol):
    name: str
    version: str

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...

    def render_chat(self, messages: list[dict]) -> str: ...

    def count_tokens(self, text: str) -> int: ...


def constraint_from_output(output) -> Constraint | None:
    """A prompt spec's `output` -> the decoding constraint (None for free text)."""
    if output.format == "json":
        return Constraint("json", output.json_schema)
    if output.format == "choice":
        return Constraint("choice", tuple(output.choices))
    if output.format == "regex":
        return Constraint("regex", output.regex)
    return None


def check_unique_ids(requests: list[GenerationRequest]) -> None:
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise RecforgeError(f"duplicate request id {r.request_id!r}: ids must be unique within a call")
        seen.add(r.request_id)
