"""Row values -> record values: ids, numbers, timestamps, item fields, tag lists, declared field kinds.

Each function raises `recforge.rejects.Skip` with a stable reason code when a value cannot be taken, so the
reader quarantines the row (`rejects.jsonl`) instead of failing. Ids become strings (42, "42" and 42.0 are one id;
bytes are decoded as UTF-8); a time without a UTC offset is read as UTC, never in the machine's zone.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from recforge.rejects import Skip

if TYPE_CHECKING:
    from recforge.readers import SourceConfig

# `read_records` field kinds: what a declared field must hold.
KINDS = ("text", "number", "list", "tags", "any")


def coerce_id(value: Any, key: str) -> str:
    """Ids become strings; 42, "42" and 42.0 are the same id. Empty, bool, fractional or nested values are errors.

    Bytes (a Parquet `binary` column) are decoded as UTF-8: str(b"42") would be the id "b'42'", which joins nothing."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Skip("invalid_id", f"{key} is bytes that are not UTF-8 (invalid byte at offset {err.start})") from None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Skip("missing_id", f"{key} is absent or empty")
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise Skip("wrong_type", f"{key} must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise Skip("wrong_type", f"{key} must be a string or an integer, got {value!r}")
        value = int(value)
    return str(value).strip()


def coerce_number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise Skip("wrong_type", f"{key} must be a number, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise Skip("wrong_type", f"{key} must be a number, got {value!r:.60}") from None
    if not math.isfinite(number):
        raise Skip("wrong_type", f"{key} must be finite, got {value!r}")
    return number


def coerce_timestamp(value: Any, key: str) -> float | None:
    """Numbers (epoch seconds, or any monotone position such as seq_pos) or ISO-8601 strings."""
    if isinstance(value, str) and value.strip() and not value.strip().lstrip("-").replace(".", "", 1).isdigit():
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Skip("wrong_type", f"{key} must be a number or an ISO-8601 time, got {value!r:.60}") from None
        # A time without an offset is UTC, as everywhere else in recforge (LARR renders hours in UTC): read in
        # the machine's zone, one file would give other timestamps, splits and features on another host.
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return coerce_number(value, key)


def coerce_field(value: Any, key: str, src: SourceConfig) -> Any:
    """An item field: text (stripped; empty = absent), a list of strings, or a number."""
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, dict):
        raise Skip("wrong_type", f"field {key!r} must be text, a list or a number, got {type(value).__name__}")
    if isinstance(value, str):
        sep = src.list_separators.get(key)
        if sep is not None:
            value = [part for part in value.split(sep)]
        else:
            text = value.strip()
            if len(text) > src.max_field_chars:
                raise Skip("field_too_long", f"field {key!r} has {len(text)} chars > max_field_chars={src.max_field_chars}")
            return text or None
    if isinstance(value, list):
        items = []
        for v in value:
            if isinstance(v, (dict, list, bool)) or v is None:
                raise Skip("wrong_type", f"field {key!r} must be a list of strings, has a {type(v).__name__}")
            text = str(v).strip()
            if len(text) > src.max_field_chars:
                raise Skip("field_too_long", f"field {key!r} has an element of {len(text)} chars")
            if text:
                items.append(text)
        return items or None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise Skip("wrong_type", f"field {key!r} must be finite, got {value!r}")
        return value
    raise Skip("wrong_type", f"field {key!r} has unsupported type {type(value).__name__}")


def has_text(fields: dict[str, Any]) -> bool:
    return any(isinstance(v, str) or (isinstance(v, list) and v) for v in fields.values())


def no_text(fields: dict[str, Any], mapping: dict[str, str]) -> Skip:
    """Why an item has no text: a number where text should be is `wrong_type`, nothing at all `empty_text`."""
    numbers = {k: v for k, v in fields.items() if isinstance(v, (int, float))}
    if numbers:
        key, value = next(iter(numbers.items()))
        return Skip("wrong_type", f"field {key!r} holds a number ({value!r}), not text; no text in fields {sorted(mapping)}")
    return Skip("empty_text", f"no text in fields {sorted(mapping)}")


def tag_entries(tags: Any, column: str) -> list[tuple[str, float]]:
    """(name, count) per tag of a list of strings or of objects with `tag_name`/`name` (+ optional `count`)."""
    if not isinstance(tags, list):
        raise Skip("wrong_type", f"{column!r} must be a list of tags")
    out = []
    for rank, tag in enumerate(tags):
        label, count = (tag.get("tag_name", tag.get("name")), tag.get("count", 1)) if isinstance(tag, dict) else (tag, 1)
        if not isinstance(label, str) or not label.strip() or isinstance(count, bool) or not isinstance(count, (int, float)):
            raise Skip("wrong_type", f"tag #{rank} of {column!r} has no text name or a non-numeric count")
        out.append((label.strip(), float(count)))
    return out


def check_kind(value: Any, key: str, kind: str) -> Any:
    """A declared field of `read_records`: absent text is `empty_text`, anything of another type `wrong_type`.

    Returns the value; a `tags` list comes back as [{tag_name, count}] whichever of the two forms it had."""
    if kind == "tags":
        return None if value is None else [{"tag_name": n, "count": c} for n, c in tag_entries(value, key)]
    if kind == "text":
        if isinstance(value, (bool, int, float, dict, list)):
            raise Skip("wrong_type", f"field {key!r} must be text, got {type(value).__name__}")
        if value is None or not str(value).strip():
            raise Skip("empty_text", f"field {key!r} is absent or empty")
    elif kind == "number":
        if coerce_number(value, key) is None:
            raise Skip("missing_field", f"field {key!r} is absent")
    elif kind == "list":
        if value is not None and not isinstance(value, list):
            raise Skip("wrong_type", f"field {key!r} must be a list, got {type(value).__name__}")
    elif value is None:
        raise Skip("missing_field", f"field {key!r} is absent")
    return value


def as_text(value: Any) -> str:
    """A text field that may hold a list of strings (joined) or text."""
    return ", ".join(value) if isinstance(value, list) else str(value)
