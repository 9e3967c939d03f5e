"""Rejected rows: the reason codes, the reject log (`rejects.jsonl`) and `strict`.

Bad rows never stop a build and are never dropped silently: each one goes to `rejects.jsonl` with the file, the
line (1-based; the data row number for Parquet), a reason code and the raw text. The reason codes are stable
(`REASONS`); `strict` turns the first reject (of any reason, or of the listed ones) into a `DataError`.
A row converter raises `Skip(reason, detail)` and the reader (`recforge.readers`) logs the row with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recforge.config import RecforgeError
from recforge.io import JsonlAppender


REASONS = {
    "invalid_json": "the line is not a JSON object",
    "bad_utf8": "the line is not valid UTF-8",
    "bad_csv_row": "the row has a different number of columns than the header",
    "missing_id": "a required id is absent or empty",
    "invalid_id": "an id is bytes that are not UTF-8 text (e.g. a binary Parquet column)",
    "missing_field": "a required field other than an id (a grade, a number) is absent",
    "wrong_type": "a value has a type the field cannot take",
    "empty_text": "no text left in the row's text fields",
    "field_too_long": "a text field is longer than max_field_chars",
    "conflicting_duplicate": "the id was seen before with different content",
    "short_history": "a user record has fewer known history events than min_events",
}

MAX_RAW_CHARS = 1_000_000  # a quarantined line is kept whole up to this size


class DataError(RecforgeError):
    """A malformed row under `strict`: names the file, the line and the reason."""


@dataclass
class RejectLog:
    """Collects rejected rows; writes them to `path` (rejects.jsonl) when given, else keeps them in memory."""

    path: Path | None = None
    strict: bool | list[str] = False
    counts: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # non-rejects worth reporting (e.g. identical duplicates)
    kept: list[dict] = field(default_factory=list)
    _writer: JsonlAppender | None = None

    def reject(self, file: str | Path | None, line: int | None, reason: str, detail: str, raw: str | None,
               source: str = "", **extra: Any) -> None:
        assert reason in REASONS, reason
        if self.strict is True or (isinstance(self.strict, list) and reason in self.strict):
            raise DataError(f"{file}:{line}: {reason}: {detail}")
        if raw is not None and len(raw) > MAX_RAW_CHARS:
            raw = raw[:MAX_RAW_CHARS] + f"... [{len(raw) - MAX_RAW_CHARS} more chars]"
        entry = {"file": None if file is None else str(file), "line": line, "reason": reason, "detail": detail,
                 "source": source, "raw": raw, **extra}
        self.counts[reason] += 1
        if self.path is None:
            self.kept.append(entry)
            return
        if self._writer is None:
            self._writer = JsonlAppender(self.path)
        self._writer.write(entry)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Skip(Exception):
    """Raised inside row conversion: the row goes to the reject log with this reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

