"""Readers: every file any stage reads (JSONL / JSONL.gz, CSV / TSV, Parquet) -> recforge records or rows.

A field mapping in the recipe plugs any schema in without code:

    inputs:
      products: {path: sample://esci_us_titles/products.jsonl.gz, id: product_id, fields: {title: product_title}}

Bad rows never stop a build and are never dropped silently: each one goes to `rejects.jsonl` with the
file, the line (1-based; the data row number for Parquet), a reason code and the raw text. The reason
codes are stable (`REASONS`); `strict` turns the first reject (of any reason, or of the listed ones)
into an error. A mistake in the recipe itself (a mapped column that the file does not have, a missing
file) is an error naming the recipe key, not a reject.

A file that cannot be read at all (a truncated `.gz`, a `.parquet` that is not Parquet) is one error naming
it, not a traceback. A UTF-8 byte order mark is not part of the first row; ids in a Parquet `binary` column are
decoded as UTF-8 (`invalid_id` when they are not); a time without a UTC offset is read as UTC, never in the
machine's zone.

Rows are validated one at a time in Python because that is what gives line-level rejects; the heavy
work on interaction logs (group-bys, joins) happens afterwards in Polars, on the frame
`read_interactions` returns, built in bounded chunks.

Every stage reads through this module (data_recipes, finetune, generate, align): `read_items`,
`read_queries`, `read_judgments`, `read_interactions`, `read_item_tags` for typed records, and
`read_records` for rows kept as they are (nested values such as a user's history or a book's tag list),
with declared field types checked, and `features_table` for generate-export's features table (one unit: a bad
table is an error, not rejects). `recforge.data_recipes.readers` re-exports this module.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from recforge.config import RecforgeError, RecipeModel
from recforge.io import JsonlAppender, resolve_path
from recforge.records import Item, Judgment, Query

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
# `read_records` field kinds: what a declared field must hold.
KINDS = ("text", "number", "list", "tags", "any")

MAX_RAW_CHARS = 1_000_000  # a quarantined line is kept whole up to this size
CHUNK_ROWS = 200_000  # interactions are turned into a Polars frame this many rows at a time

Format = Literal["auto", "jsonl", "csv", "tsv", "parquet"]


class SourceConfig(RecipeModel):
    """One input file and how its columns map onto a record.

    `fields` maps record fields to file columns. Items: text/list/number fields (empty = every column
    but the id). Queries: `text`. Judgments: `query_id`, `item_id`, `grade`. Interactions: `user_id`,
    `item_id` and/or `query_id`, `timestamp`, `label`, `weight`, `event`.
    """

    path: str
    format: Format = "auto"
    id: str | None = Field(default=None, description="column holding the record id (items and queries)")
    fields: dict[str, str] = Field(default_factory=dict)
    list_separators: dict[str, str] = Field(
        default_factory=dict, description="for CSV/TSV: split these fields into lists on a separator"
    )
    grade_map: dict[str, float] = Field(
        default_factory=dict, description="judgments: labels to grades, e.g. {E: 3, S: 2, C: 1, I: 0}"
    )
    event: str = Field(default="click", description="interactions: event name when no event column is mapped")
    max_field_chars: int = 20_000


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


class _Skip(Exception):
    """Raised inside row conversion: the row goes to the reject log with this reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _RawRow:
    line: int
    values: dict[str, Any] | None  # None when the line could not be parsed at all
    raw: str
    reason: str = ""
    detail: str = ""


# ---------------------------------------------------------------- raw row iteration per format


def detect_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                         (".tsv", "tsv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return kind
    raise RecforgeError(f"{path}: cannot tell the format from the file name; set format: jsonl|csv|tsv|parquet")


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Excel, Windows tools) is not part of the first row


def _binary_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f):
            yield line.removeprefix(BOM) if n == 0 else line


# What a broken file raises while being read: a truncated or corrupt gzip stream, a non-Parquet file.
# Only read calls are guarded (`_guarded`), so an error writing rejects (a full disk) is not mistaken for it.
def _unreadable_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (EOFError, gzip.BadGzipFile, zlib.error, pa.ArrowException)


def _guarded(rows: Iterator[Any], path: Path, fmt: str) -> Iterator[Any]:
    """`rows`, with a broken file turned into one error naming it (no traceback), however far reading got."""
    errors = _unreadable_errors()
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except errors as err:
            raise _unreadable(path, fmt, err) from None
        yield row


def _unreadable(path: Path, fmt: str, err: BaseException) -> RecforgeError:
    detail = (str(err).splitlines() or [""])[0][:200] or type(err).__name__
    gz = " (gzip)" if path.name.endswith(".gz") else ""
    return RecforgeError(f"{path}: not a readable {fmt}{gz} file, truncated or of another format: {detail}")


def _decode(line: bytes, keep_end: bool = False) -> tuple[str | None, str]:
    """UTF-8 text of a line; `keep_end` keeps the line end (csv needs it inside a quoted multi-line field)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 byte at offset {err.start}"
    return (text if keep_end else text.rstrip("\r\n")), ""


def _iter_jsonl(path: Path) -> Iterator[_RawRow]:
    for n, line in enumerate(_binary_lines(path), start=1):
        text, problem = _decode(line)
        if text is None:
            yield _RawRow(n, None, line.decode("utf-8", "backslashreplace").rstrip("\r\n"), "bad_utf8", problem)
            continue
        if not text.strip():
            continue  # blank lines carry no row
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield _RawRow(n, None, text, "invalid_json", f"JSON error: {err.msg} at column {err.colno}")
            continue
        if not isinstance(obj, dict):
            yield _RawRow(n, None, text, "invalid_json", f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield _RawRow(n, obj, text)


def _iter_delimited(path: Path, delimiter: str) -> Iterator[_RawRow]:
    bad: list[_RawRow] = []
    physical = {"line": 0}  # the file line the csv reader has consumed up to (undecodable lines included)

    def decoded_lines() -> Iterator[str]:
        for n, line in enumerate(_binary_lines(path), start=1):
            physical["line"] = n
            # line ends kept: csv.reader joins the lines of a quoted field with them (stripped, "a\nb" became "ab")
            text, problem = _decode(line, keep_end=True)
            if text is None:
                bad.append(_RawRow(n, None, line.decode("utf-8", "backslashreplace").rstrip("\r\n"), "bad_utf8", problem))
                continue
            yield text

    reader = csv.reader(decoded_lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    for cells in reader:
        yield from bad
        bad.clear()
        line = physical["line"]  # a quoted field spanning lines reports the line where the row ends
        raw = delimiter.join(cells)
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield _RawRow(line, None, raw, "bad_csv_row", f"{len(cells)} columns, header has {len(header)}")
            continue
        yield _RawRow(line, {h: (c if c != "" else None) for h, c in zip(header, cells)}, raw)
    yield from bad


def _iter_parquet(path: Path) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        for row in batch.to_pylist():
            n += 1
            yield _RawRow(n, row, "")  # raw filled lazily on reject (see _raw_text)


def iter_raw_rows(path: Path, fmt: str) -> Iterator[_RawRow]:
    if fmt == "jsonl":
        rows = _iter_jsonl(path)
    elif fmt in ("csv", "tsv"):
        rows = _iter_delimited(path, "," if fmt == "csv" else "\t")
    else:
        rows = _iter_parquet(path)
    return _guarded(rows, path, fmt)


def file_columns(path: Path, fmt: str) -> list[str] | None:
    """The columns a file declares (CSV/TSV header, Parquet schema); None for JSONL (rows may differ)."""
    try:
        return _file_columns(path, fmt)
    except _unreadable_errors() as err:
        raise _unreadable(path, fmt, err) from None


def _file_columns(path: Path, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt in ("csv", "tsv"):
        for line in _binary_lines(path):
            text, _ = _decode(line)
            if text is None:
                return None
            return [h.strip() for h in next(csv.reader([text], delimiter="," if fmt == "csv" else "\t"))]
    return None


# ---------------------------------------------------------------- value coercion


def _raw_text(row: _RawRow) -> str:
    return row.raw or json.dumps(row.values, ensure_ascii=False, default=str)


def coerce_id(value: Any, key: str) -> str:
    """Ids become strings; 42, "42" and 42.0 are the same id. Empty, bool, fractional or nested values are errors.

    Bytes (a Parquet `binary` column) are decoded as UTF-8: str(b"42") would be the id "b'42'", which joins nothing."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Skip("invalid_id", f"{key} is bytes that are not UTF-8 (invalid byte at offset {err.start})") from None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Skip("missing_id", f"{key} is absent or empty")
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise _Skip("wrong_type", f"{key} must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise _Skip("wrong_type", f"{key} must be a string or an integer, got {value!r}")
        value = int(value)
    return str(value).strip()


def coerce_number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise _Skip("wrong_type", f"{key} must be a number, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise _Skip("wrong_type", f"{key} must be a number, got {value!r:.60}") from None
    if not math.isfinite(number):
        raise _Skip("wrong_type", f"{key} must be finite, got {value!r}")
    return number


def coerce_timestamp(value: Any, key: str) -> float | None:
    """Numbers (epoch seconds, or any monotone position such as seq_pos) or ISO-8601 strings."""
    if isinstance(value, str) and value.strip() and not value.strip().lstrip("-").replace(".", "", 1).isdigit():
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _Skip("wrong_type", f"{key} must be a number or an ISO-8601 time, got {value!r:.60}") from None
        # A time without an offset is UTC, as everywhere else in recforge (LARR renders hours in UTC): read in
        # the machine's zone, one file would give other timestamps, splits and features on another host.
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return coerce_number(value, key)


def coerce_field(value: Any, key: str, src: SourceConfig) -> Any:
    """An item field: text (stripped; empty = absent), a list of strings, or a number."""
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, dict):
        raise _Skip("wrong_type", f"field {key!r} must be text, a list or a number, got {type(value).__name__}")
    if isinstance(value, str):
        sep = src.list_separators.get(key)
        if sep is not None:
            value = [part for part in value.split(sep)]
        else:
            text = value.strip()
            if len(text) > src.max_field_chars:
                raise _Skip("field_too_long", f"field {key!r} has {len(text)} chars > max_field_chars={src.max_field_chars}")
            return text or None
    if isinstance(value, list):
        items = []
        for v in value:
            if isinstance(v, (dict, list, bool)) or v is None:
                raise _Skip("wrong_type", f"field {key!r} must be a list of strings, has a {type(v).__name__}")
            text = str(v).strip()
            if len(text) > src.max_field_chars:
                raise _Skip("field_too_long", f"field {key!r} has an element of {len(text)} chars")
            if text:
                items.append(text)
        return items or None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _Skip("wrong_type", f"field {key!r} must be finite, got {value!r}")
        return value
    raise _Skip("wrong_type", f"field {key!r} has unsupported type {type(value).__name__}")


def _has_text(fields: dict[str, Any]) -> bool:
    return any(isinstance(v, str) or (isinstance(v, list) and v) for v in fields.values())


def _no_text(fields: dict[str, Any], mapping: dict[str, str]) -> _Skip:
    """Why an item has no text: a number where text should be is `wrong_type`, nothing at all `empty_text`."""
    numbers = {k: v for k, v in fields.items() if isinstance(v, (int, float))}
    if numbers:
        key, value = next(iter(numbers.items()))
        return _Skip("wrong_type", f"field {key!r} holds a number ({value!r}), not text; no text in fields {sorted(mapping)}")
    return _Skip("empty_text", f"no text in fields {sorted(mapping)}")


# ---------------------------------------------------------------- generic driver


class FileKey(str):
    """A reader `name` that is itself the recipe key of the file (`relevance.queries`), not a section with a
    `path` key (`inputs.items` -> `inputs.items.path`): errors then name that key as it is."""


def _where(name: str, part: str) -> str:
    """The recipe key an error names: `inputs.items.path`, `inputs.items.fields.title`, or a FileKey itself."""
    return str(name) if isinstance(name, FileKey) else f"{name}.{part}"


def _open_source(src: SourceConfig, name: str) -> tuple[Path, str]:
    path = resolve_path(src.path)
    if not path.is_file():
        raise RecforgeError(f"{_where(name, 'path')}: file not found: {src.path}"
                            + (f" (resolved to {path})" if str(path) != src.path else ""))
    return path, detect_format(path, src.format)


def _check_columns(path: Path, fmt: str, mapping: dict[str, str], name: str, seen: set[str] | None = None) -> None:
    """A mapped column that the file does not have is a recipe error, named by its recipe key."""
    columns = file_columns(path, fmt) if seen is None else sorted(seen)
    if columns is None:
        return
    for key, column in mapping.items():
        if column not in columns:
            where = _where(name, "fields." + key if key != "id" else "id")
            raise RecforgeError(f"{where}: column {column!r} is not in {path} (columns: {', '.join(columns[:30])})")


def _convert_rows(src: SourceConfig, rejects: RejectLog, name: str, required: dict[str, str], convert) -> Iterator[Any]:
    """Parse rows, quarantine the bad ones, yield `convert(values, line)` for the good ones."""
    path, fmt = _open_source(src, name)
    _check_columns(path, fmt, required, name)
    seen_columns: set[str] = set()
    good, first_bad = 0, None
    for row in iter_raw_rows(path, fmt):
        if row.values is None:
            first_bad = first_bad or (row.line, f"{row.reason}: {row.detail}")
            rejects.reject(path, row.line, row.reason, row.detail, row.raw, name)
            continue
        if fmt == "jsonl":
            seen_columns.update(row.values)
        try:
            converted = convert(row.values, row.line)
        except _Skip as skip:
            first_bad = first_bad or (row.line, f"{skip.reason}: {skip.detail}")
            rejects.reject(path, row.line, skip.reason, skip.detail, _raw_text(row), name)
            continue
        good += 1
        yield converted
    if fmt == "jsonl" and seen_columns:
        _check_columns(path, fmt, {k: v for k, v in required.items() if k != "id"}, name, seen_columns)
    if not good:
        # Nothing usable: every later step would fail on an empty table, far from the cause.
        why = f"every row was rejected (first: line {first_bad[0]}, {first_bad[1]})" if first_bad else "it holds no rows"
        raise RecforgeError(f"{_where(name, 'path')}: {src.path}: no usable rows, {why}")


def _dedupe(records: Iterator[tuple[str, Any, int, str]], rejects: RejectLog, path: Path, name: str) -> list[Any]:
    """Keep the first record per id; an identical repeat is noted, a conflicting one rejected."""
    first: dict[str, tuple[Any, int]] = {}
    for key, record, line, raw in records:
        if key not in first:
            first[key] = (record, line)
        elif first[key][0] == record:
            rejects.notes["duplicate_identical"] += 1
        else:
            rejects.reject(path, line, "conflicting_duplicate",
                           f"id {key!r} first seen on line {first[key][1]} with different content", raw, name)
    return [record for record, _ in first.values()]


# ---------------------------------------------------------------- public readers


def read_items(src: SourceConfig, rejects: RejectLog, name: str = "items") -> list[Item]:
    """Catalogue rows -> Items (first occurrence per id; conflicting duplicates rejected)."""
    if not src.id:
        raise RecforgeError(f"{name}.id: the id column of the items must be set")
    path, _ = _open_source(src, name)

    def convert(values: dict, line: int):
        item_id = coerce_id(values.get(src.id), src.id)
        mapping = src.fields or {c: c for c in values if c != src.id}
        fields = {}
        for key, column in mapping.items():
            value = coerce_field(values.get(column), key, src)
            if value is not None:
                fields[key] = value
        if not _has_text(fields):
            raise _no_text(fields, mapping)
        return item_id, Item(item_id, fields), line, json.dumps(values, ensure_ascii=False, default=str)

    required = {"id": src.id, **src.fields}
    return _dedupe(_convert_rows(src, rejects, name, required, convert), rejects, path, name)


def read_queries(src: SourceConfig, rejects: RejectLog, name: str = "queries") -> list[Query]:
    if not src.id:
        raise RecforgeError(f"{name}.id: the id column of the queries must be set")
    text_column = src.fields.get("text", "text")
    path, _ = _open_source(src, name)

    def convert(values: dict, line: int):
        query_id = coerce_id(values.get(src.id), src.id)
        text = coerce_field(values.get(text_column), "text", src)
        if not isinstance(text, str):
            if text is None:
                raise _Skip("empty_text", f"query text column {text_column!r} is absent or empty")
            raise _Skip("wrong_type", f"query text column {text_column!r} must be a string")
        return query_id, Query(query_id, text), line, json.dumps(values, ensure_ascii=False, default=str)

    return _dedupe(_convert_rows(src, rejects, name, {"id": src.id, "text": text_column}, convert), rejects, path, name)


def read_judgments(src: SourceConfig, rejects: RejectLog, name: str = "judgments") -> list[Judgment]:
    cols = {"query_id": "query_id", "item_id": "item_id", "grade": "grade", **src.fields}
    path, _ = _open_source(src, name)

    def convert(values: dict, line: int):
        query_id = coerce_id(values.get(cols["query_id"]), cols["query_id"])
        item_id = coerce_id(values.get(cols["item_id"]), cols["item_id"])
        raw_grade = values.get(cols["grade"])
        if isinstance(raw_grade, str) and raw_grade.strip() in src.grade_map:
            grade = src.grade_map[raw_grade.strip()]
        else:
            grade = coerce_number(raw_grade, cols["grade"])
        if grade is None:
            raise _Skip("missing_field", f"{cols['grade']} is absent")
        key = f"{query_id}\t{item_id}"
        return key, Judgment(query_id, item_id, grade), line, json.dumps(values, ensure_ascii=False, default=str)

    return _dedupe(_convert_rows(src, rejects, name, {k: cols[k] for k in ("query_id", "item_id", "grade")}, convert),
                   rejects, path, name)


INTERACTION_COLUMNS = ("user_id", "item_id", "query_id", "event", "timestamp", "label", "weight")


def interactions_schema():
    import polars as pl

    return {
        "user_id": pl.Utf8, "item_id": pl.Utf8, "query_id": pl.Utf8, "event": pl.Utf8,
        "timestamp": pl.Float64, "label": pl.Float64, "weight": pl.Float64, "line": pl.Int64,
    }


def read_interactions(src: SourceConfig, rejects: RejectLog, name: str = "interactions"):
    """Behaviour events -> a Polars frame (ids as strings; `line` = source line, for provenance and stable order).

    Repeated events are legitimate (a user clicks twice) and all kept. Rows without a timestamp column
    keep file order through `line`.
    """
    import polars as pl

    mapping = {k: v for k, v in src.fields.items()}
    unknown = set(mapping) - set(INTERACTION_COLUMNS)
    if unknown:
        raise RecforgeError(f"{name}.fields: unknown interaction field(s) {sorted(unknown)}; use {list(INTERACTION_COLUMNS)}")
    mapping.setdefault("user_id", "user_id")
    if "item_id" not in mapping and "query_id" not in mapping:
        mapping["item_id"] = "item_id"

    def convert(values: dict, line: int):
        user = coerce_id(values.get(mapping["user_id"]), mapping["user_id"])
        item = query = None
        if "item_id" in mapping and values.get(mapping["item_id"]) is not None:
            item = coerce_id(values.get(mapping["item_id"]), mapping["item_id"])
        if "query_id" in mapping and values.get(mapping["query_id"]) is not None:
            query = coerce_id(values.get(mapping["query_id"]), mapping["query_id"])
        if item is None and query is None:
            wanted = " or ".join(mapping[k] for k in ("item_id", "query_id") if k in mapping)
            raise _Skip("missing_id", f"{wanted} is absent or empty")
        event = values.get(mapping["event"]) if "event" in mapping else src.event
        if event is not None and not isinstance(event, str):
            raise _Skip("wrong_type", f"{mapping.get('event')} must be a string")
        return (
            user, item, query, event or src.event,
            coerce_timestamp(values.get(mapping["timestamp"]), mapping["timestamp"]) if "timestamp" in mapping else None,
            coerce_number(values.get(mapping["label"]), mapping["label"]) if "label" in mapping else None,
            coerce_number(values.get(mapping["weight"]), mapping["weight"]) if "weight" in mapping else None,
            line,
        )

    schema = interactions_schema()
    frames = []
    chunk: list[tuple] = []
    for row in _convert_rows(src, rejects, name, mapping, convert):
        chunk.append(row)
        if len(chunk) >= CHUNK_ROWS:
            frames.append(pl.DataFrame(chunk, schema=schema, orient="row"))
            chunk = []
    frames.append(pl.DataFrame(chunk, schema=schema, orient="row"))
    return pl.concat(frames, how="vertical", rechunk=True)


def read_item_tags(src: SourceConfig, rejects: RejectLog, name: str = "item_tags"):
    """Per-item tags (e.g. goodbooks shelves) -> a Polars frame (item_id, tag, count, rank).

    The tags column holds a list of strings or of objects with `tag_name`/`name` (+ optional `count`);
    rank keeps the file's order (most applied first).
    """
    import polars as pl

    if not src.id:
        raise RecforgeError(f"{name}.id: the id column of the tagged items must be set")

    column = src.fields.get("tags", "tags")
    rows: list[tuple] = []

    def convert(values: dict, line: int):
        item_id = coerce_id(values.get(src.id), src.id)
        return [(item_id, label, count, rank) for rank, (label, count) in enumerate(tag_entries(values.get(column), column))]

    for tags in _convert_rows(src, rejects, name, {"id": src.id}, convert):
        rows.extend(tags)
    return pl.DataFrame(rows, schema={"item_id": pl.Utf8, "tag": pl.Utf8, "count": pl.Float64, "rank": pl.Int64},
                        orient="row").unique(["item_id", "tag"], keep="first", maintain_order=True)


def tag_entries(tags: Any, column: str) -> list[tuple[str, float]]:
    """(name, count) per tag of a list of strings or of objects with `tag_name`/`name` (+ optional `count`)."""
    if not isinstance(tags, list):
        raise _Skip("wrong_type", f"{column!r} must be a list of tags")
    out = []
    for rank, tag in enumerate(tags):
        label, count = (tag.get("tag_name", tag.get("name")), tag.get("count", 1)) if isinstance(tag, dict) else (tag, 1)
        if not isinstance(label, str) or not label.strip() or isinstance(count, bool) or not isinstance(count, (int, float)):
            raise _Skip("wrong_type", f"tag #{rank} of {column!r} has no text name or a non-numeric count")
        out.append((label.strip(), float(count)))
    return out


def _check_kind(value: Any, key: str, kind: str) -> Any:
    """A declared field of `read_records`: absent text is `empty_text`, anything of another type `wrong_type`.

    Returns the value; a `tags` list comes back as [{tag_name, count}] whichever of the two forms it had."""
    if kind == "tags":
        return None if value is None else [{"tag_name": n, "count": c} for n, c in tag_entries(value, key)]
    if kind == "text":
        if isinstance(value, (bool, int, float, dict, list)):
            raise _Skip("wrong_type", f"field {key!r} must be text, got {type(value).__name__}")
        if value is None or not str(value).strip():
            raise _Skip("empty_text", f"field {key!r} is absent or empty")
    elif kind == "number":
        if coerce_number(value, key) is None:
            raise _Skip("missing_field", f"field {key!r} is absent")
    elif kind == "list":
        if value is not None and not isinstance(value, list):
            raise _Skip("wrong_type", f"field {key!r} must be a list, got {type(value).__name__}")
    elif value is None:
        raise _Skip("missing_field", f"field {key!r} is absent")
    return value


def read_records(src: SourceConfig, rejects: RejectLog, name: str, kinds: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """Rows kept as they are (nested values too) -> (id, record), first occurrence per id.

    `src.id` names the id column; `src.fields` maps record field -> column (empty: the whole row);
    `kinds` declares what a record field must hold (`text`, `number`, `list`, `tags` or `any`): a row that
    does not comply is quarantined like every other bad row. Values are not coerced (a number stays a
    number), except `tags`, normalised to [{tag_name, count}].
    """
    if not src.id:
        raise RecforgeError(f"{name}.id: the id column of the records must be set")
    kinds = kinds or {}
    unknown = sorted(set(kinds.values()) - set(KINDS))
    assert not unknown, unknown
    path, _ = _open_source(src, name)

    def convert(values: dict, line: int):
        record_id = coerce_id(values.get(src.id), src.id)
        record = {k: values.get(c) for k, c in src.fields.items()} if src.fields else dict(values)
        for key, kind in kinds.items():
            value = _check_kind(record.get(key), key, kind)
            if key in record:
                record[key] = value
        return record_id, (record_id, record), line, json.dumps(values, ensure_ascii=False, default=str)

    required = {"id": src.id, **src.fields}
    return _dedupe(_convert_rows(src, rejects, name, required, convert), rejects, path, name)


# The features table's list columns (`recforge.records.features_schema()`).
FEATURES_LIST_COLUMNS = ("tags", "pseudo_queries")


def features_table(path: str, key: str, fmt: Format = "auto", rename: dict[str, str] | None = None,
                   required: tuple[str, ...] = ("entity_id",)):
    """generate-export's features table (`recforge.records.features_schema()`) as a pyarrow Table: the one reader
    of it. `path` is a Parquet file, a folder of them (read together, columns unified) or a JSONL[.gz] file.

    `rename` maps a file's own column names to the table's (a recipe's field mapping) before the checks. A file
    that does not open, lacks a `required` column, or whose list columns (`tags`, `pseudo_queries`) hold
    something else is a one-line error naming `key` and the file (the table is one unit, not rows to quarantine).
    The consumer checks that its producer finished (`recforge.runstate.require_complete`) where it reads it.
    """
    import pyarrow as pa

    tables = [_features_file(f, key, fmt) for f in _features_files(path, key)]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    if rename:
        table = table.rename_columns([rename.get(c, c) for c in table.column_names])
    _check_features_columns(table, path, key, required)
    return table


def read_features_table(path: str, key: str) -> list[dict]:
    """generate's features table (`features_table`) as rows."""
    return features_table(path, key).to_pylist()


def _check_features_columns(table, path: str, key: str, required: tuple[str, ...]) -> None:
    import pyarrow as pa

    for column in required:
        if column not in table.column_names:
            raise RecforgeError(f"{key}: {path}: not a features table, no column {column!r} "
                                f"(recforge.records.features_schema(); columns: {table.column_names})")
    for column in FEATURES_LIST_COLUMNS:
        if column not in table.column_names:
            continue
        kind = table.schema.field(column).type
        # a JSONL file read through Polars gives large lists, or null where no row has a value
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_null(kind)):
            raise RecforgeError(f"{key}: {path}: column {column!r} must be a list of strings, got {kind}")


def _features_files(path: str, key: str) -> list[Path]:
    root = resolve_path(path)
    if root.is_dir():
        files = sorted(root.glob("**/*.parquet"))
        if not files:
            raise RecforgeError(f"{key}: no .parquet file in {root} (expected generate-export's features table)")
        return files
    if not root.is_file():
        raise RecforgeError(f"{key}: file not found: {path}")
    return [root]


def _features_file(path: Path, key: str, fmt: Format):
    """One features file as a pyarrow Table: JSONL[.gz] by its name or `fmt`, Parquet otherwise."""
    import pyarrow.parquet as pq

    name = path.name.lower().removesuffix(".gz")
    jsonl = fmt == "jsonl" or (fmt == "auto" and name.endswith((".jsonl", ".ndjson", ".json")))
    try:
        return _jsonl_table(path) if jsonl else pq.read_table(path)
    except Exception as err:  # pyarrow, gzip and json raise several types for a broken or empty file
        kind = "JSONL" if jsonl else "Parquet"
        raise RecforgeError(f"{key}: {path}: not a readable {kind} file ({type(err).__name__})") from None


def _jsonl_table(path: Path):
    """A JSONL[.gz] file as a table; Polars infers each column's type from every row, not the first one."""
    import polars as pl

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return pl.DataFrame([json.loads(line) for line in f if line.strip()], infer_schema_length=None).to_arrow()


def read_esci(paths: tuple[str, str, str], keys: tuple[str, str, str], rejects: RejectLog
              ) -> tuple[dict[str, str], dict[str, str], list[Judgment]]:
    """The ESCI sample's queries, products and judgments in its own column names (`query_id`/`query`,
    `product_id`/`product_title`, `relevance`): (query id -> text, product id -> title, judgments).
    `keys` are the recipe keys of the three paths, for errors."""
    queries, products, judgments = paths
    query_text = {q.query_id: q.text for q in read_queries(
        SourceConfig(path=queries, id="query_id", fields={"text": "query"}), rejects, FileKey(keys[0]))}
    titles = {p.item_id: as_text(p.fields["title"]) for p in read_items(
        SourceConfig(path=products, id="product_id", fields={"title": "product_title"}), rejects, FileKey(keys[1]))}
    graded = read_judgments(SourceConfig(path=judgments, fields={"item_id": "product_id", "grade": "relevance"}),
                            rejects, FileKey(keys[2]))
    return query_text, titles, graded


def as_text(value: Any) -> str:
    """A text field that may hold a list of strings (joined) or text."""
    return ", ".join(value) if isinstance(value, list) else str(value)
