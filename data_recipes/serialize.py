"""Item serializer: an item's fields -> one training text, in the style the recipe asks for.

Two styles (CPRM / LARR both feed a decoder LLM multi-field items):

- `plain`:  "Title: The Hobbit\nAuthors: J.R.R. Tolkien"
- `pieces`: each field is a *piece* wrapped in special tokens, so the model can tell fields apart and a
  field can be masked / predicted whole:
    piece_tokens=generic   -> "<|startofpiece|>Title: The Hobbit<|endofpiece|><|startofpiece|>Authors: ...<|endofpiece|>"
    piece_tokens=per_field -> "<|title|>The Hobbit<|endofpiece|><|authors|>J.R.R. Tolkien<|endofpiece|>"

The special tokens actually emitted are collected (`Serializer.special_tokens`) and written to the
manifest so finetune can add them to the tokenizer (and train their embedding rows).

Per-field budgets (`max_chars`, `max_tokens`) cut long fields before they crowd out the rest; `fields`
fixes the order (and which fields appear); `field_dropout` drops fields at random (seeded, never the
`keep_fields`) so the model does not learn to rely on one field always being there.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field, PositiveInt

from recforge.config import RecforgeError, RecipeModel
from recforge.records import Item

START_PIECE = "<|startofpiece|>"
END_PIECE = "<|endofpiece|>"
_WORD_RE = re.compile(r"\S+")


class TokenCountConfig(RecipeModel):
    """How `max_tokens` budgets are counted.

    `whitespace` (default, free): one token per whitespace-separated word. `chars`: len(text) /
    chars_per_token. `tokenizer`: the real tokenizer at `tokenizer` (a local folder or hub name loaded
    with `AutoTokenizer.from_pretrained`), exact but slower on large catalogues.
    """

    method: Literal["whitespace", "chars", "tokenizer"] = "whitespace"
    chars_per_token: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    tokenizer: str | None = None


class TokenCounter:
    """Counts and truncates text in the unit the recipe chose (see `TokenCountConfig`)."""

    def __init__(self, config: TokenCountConfig | None = None):
        self.config = config or TokenCountConfig()
        self._tok = None
        if self.config.method == "tokenizer":
            if not self.config.tokenizer:
                raise RecforgeError("token_count.tokenizer: set a tokenizer path when method is 'tokenizer'")
            from transformers import AutoTokenizer

            from recforge.io import resolve_path

            try:
                self._tok = AutoTokenizer.from_pretrained(str(resolve_path(self.config.tokenizer)))
            except (OSError, ValueError) as err:
                raise RecforgeError(f"token_count.tokenizer: cannot load {self.config.tokenizer!r}: {err}") from None

    def count(self, text: str) -> int:
        method = self.config.method
        if method == "whitespace":
            return len(_WORD_RE.findall(text))
        if method == "chars":
            return max(1, round(len(text) / self.config.chars_per_token)) if text else 0
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def count_many(self, texts: list[str]) -> list[int]:
        """Counts for many texts; the tokenizer path encodes them in one batched call."""
        if self.config.method == "tokenizer" and texts:
            return [len(ids) for ids in self._tok(texts, add_special_tokens=False)["input_ids"]]
        return [self.count(t) for t in texts]

    def truncate(self, text: str, max_tokens: int) -> str:
        method = self.config.method
        if method == "whitespace":
            words = list(_WORD_RE.finditer(text))
            return text if len(words) <= max_tokens else text[: words[max_tokens - 1].end()] if max_tokens > 0 else ""
        if method == "chars":
            limit = int(max_tokens * self.config.chars_per_token)
            return text[:limit]
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self._tok.decode(ids[:max_tokens], skip_special_tokens=True)


class SerializerConfig(RecipeModel):
    style: Literal["plain", "pieces"] = "plain"
    piece_tokens: Literal["generic", "per_field"] = Field(
        default="generic", description="pieces style: <|startofpiece|>..<|endofpiece|>, or <|field|>..<|endofpiece|>"
    )
    fields: list[str] | None = Field(default=None, description="field order; None = the item's own order, all fields")
    labels: dict[str, str] = Field(default_factory=dict, description="display names, e.g. {authors: By}")
    # a budget below 1 would blank the field in every row (and empty the corpus): refused at load, naming the key
    max_chars: dict[str, PositiveInt] = Field(default_factory=dict, description="per-field character budget")
    max_tokens: dict[str, PositiveInt] = Field(default_factory=dict, description="per-field token budget (token_count unit)")
    list_separator: str = ", "
    field_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    keep_fields: list[str] = Field(default_factory=list, description="never dropped by field_dropout")


def field_token(name: str) -> str:
    """The per-field special token of a field name: `title` -> `<|title|>`."""
    return "<|" + re.sub(r"\W+", "_", name.strip().lower()) + "|>"


def render_value(value: Any, list_separator: str) -> str:
    if isinstance(value, list):
        return list_separator.join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Serializer:
    """Turns items (and queries) into text; remembers every special token it emitted."""

    def __init__(self, config: SerializerConfig | None = None, counter: TokenCounter | None = None, seed: int = 0):
        self.config = config or SerializerConfig()
        self.counter = counter or TokenCounter()
        self.rng = random.Random(seed)
        self.used_tokens: set[str] = set()

    # -- pieces

    def label(self, name: str) -> str:
        return self.config.labels.get(name) or name.replace("_", " ").capitalize()

    def _piece(self, name: str, text: str) -> str:
        cfg = self.config
        if cfg.style == "plain":
            return f"{self.label(name)}: {text}"
        if cfg.piece_tokens == "generic":
            self.used_tokens.update((START_PIECE, END_PIECE))
            return f"{START_PIECE}{self.label(name)}: {text}{END_PIECE}"
        token = field_token(name)
        self.used_tokens.update((token, END_PIECE))
        return f"{token}{text}{END_PIECE}"

    def _budget(self, name: str, text: str) -> str:
        limit = self.config.max_chars.get(name)
        if limit is not None and len(text) > limit:
            text = text[:limit].rstrip()
        tokens = self.config.max_tokens.get(name)
        if tokens is not None:
            text = self.counter.truncate(text, tokens).rstrip()
        return text

    def field_texts(self, fields: dict[str, Any], only: list[str] | None = None) -> list[tuple[str, str]]:
        """(name, budgeted text) for the fields to show, in order; empty fields are skipped."""
        order = only if only is not None else (self.config.fields or list(fields))
        out = []
        for name in order:
            value = fields.get(name)
            if value is None or value == [] or value == "":
                continue
            text = self._budget(name, render_value(value, self.config.list_separator))
            if text:
                out.append((name, text))
        return out

    def serialize_fields(self, fields: dict[str, Any], only: list[str] | None = None, dropout: bool = True) -> str:
        parts = self.field_texts(fields, only)
        if dropout and self.config.field_dropout > 0 and len(parts) > 1:
            kept = [p for p in parts if p[0] in self.config.keep_fields or self.rng.random() >= self.config.field_dropout]
            parts = kept or parts[:1]  # never drop every field
        joiner = "\n" if self.config.style == "plain" else ""
        return joiner.join(self._piece(name, text) for name, text in parts)

    def serialize(self, item: Item, only: list[str] | None = None, dropout: bool = True) -> str:
        return self.serialize_fields(item.fields, only, dropout)

    def serialize_query(self, text: str) -> str:
        """A query is a piece too (`Query: ...`, or `<|query|>...<|endofpiece|>`), budgeted like a field named `query`."""
        return self._piece("query", self._budget("query", text))

    def special_tokens(self) -> list[str]:
        """The special tokens this serializer actually emitted, sorted (for the manifest / finetune)."""
        return sorted(self.used_tokens)
