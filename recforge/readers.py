"""Readers: every file any stage reads (JSONL / JSONL.gz, CSV / TSV, Parquet) -> recforge records or rows.

A field mapping in the recipe plugs any schema in without code:

    inputs:
      products: {path: sample://esci_us_titles/products.jsonl.gz, id: product_id, fields: {title: product_title}}

Bad rows never stop a build and are never dropped silently: each one goes to `rejects.jsonl` (`recforge.rejects`:
the reason codes, the reject log, `strict`). A mistake in the recipe itself (a mapped column that the file does not
have, a missing file) is an error naming the recipe key, not a reject.

Rows are validated one at a time in Python because that is what gives line-level rejects; the heavy
work on interaction logs (group-bys, joins) happens afterwards in Polars, on the frame
`read_interactions` returns, built in bounded chunks.

Every stage reads through this module (data_recipes, finetune, generate, align): `read_items`,
`read_queries`, `read_judgments`, `read_interactions`, `read_item_tags` for typed records, and
`read_records` for rows kept as they are (nested values such as a user's history or a book's tag list),
with declared field types checked. `recforge.data_recipes.readers` re-exports this module.

The parts, one job each: `recforge.file_rows` (raw rows per format, unreadable files), `recforge.coerce`
(values -> ids, numbers, times, fields), `recforge.rejects` (the reject log), this module (the field mapping and
the readers); beside them `recforge.features_table` (generate-export's features table, one unit: a bad table is an
error, not rejects) and `recforge.esci` (the ESCI sample).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from recforge.coerce import (KINDS, check_kind, coerce_field, coerce_id, coerce_number, coerce_timestamp, has_text,
                             no_text, tag_entries)
from recforge.config import RecforgeError, RecipeModel
from recforge.file_rows import Format, detect_format, file_columns, iter_raw_rows, raw_text
from recforge.io import resolve_path
from recforge.records import Item, Judgment, Query
from recforge.rejects import RejectLog, Skip


CHUNK_ROWS = 200_000  # interactions are turned into a Polars frame this many rows at a time


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
        except Skip as skip:
            first_bad = first_bad or (row.line, f"{skip.reason}: {skip.detail}")
            rejects.reject(path, row.line, skip.reason, skip.detail, raw_text(row), name)
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
        if not has_text(fields):
            raise no_text(fields, mapping)
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
                raise Skip("empty_text", f"query text column {text_column!r} is absent or empty")
            raise Skip("wrong_type", f"query text column {text_column!r} must be a string")
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
            raise Skip("missing_field", f"{cols['grade']} is absent")
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


def interaction_row(src: SourceConfig, mapping: dict[str, str], values: dict, line: int) -> tuple:
    """One interaction row -> (user, item, query, event, timestamp, label, weight, line), by `mapping` (field ->
    column); a row that breaks a rule raises `Skip`. The rules of `read_interactions` and of data_recipes'
    column-wise Parquet reader alike."""
    user = coerce_id(values.get(mapping["user_id"]), mapping["user_id"])
    item = query = None
    if "item_id" in mapping and values.get(mapping["item_id"]) is not None:
        item = coerce_id(values.get(mapping["item_id"]), mapping["item_id"])
    if "query_id" in mapping and values.get(mapping["query_id"]) is not None:
        query = coerce_id(values.get(mapping["query_id"]), mapping["query_id"])
    if item is None and query is None:
        wanted = " or ".join(mapping[k] for k in ("item_id", "query_id") if k in mapping)
        raise Skip("missing_id", f"{wanted} is absent or empty")
    event = values.get(mapping["event"]) if "event" in mapping else src.event
    if event is not None and not isinstance(event, str):
        raise Skip("wrong_type", f"{mapping.get('event')} must be a string")
    return (
        user, item, query, event or src.event,
        coerce_timestamp(values.get(mapping["timestamp"]), mapping["timestamp"]) if "timestamp" in mapping else None,
        coerce_number(values.get(mapping["label"]), mapping["label"]) if "label" in mapping else None,
        coerce_number(values.get(mapping["weight"]), mapping["weight"]) if "weight" in mapping else None,
        line,
    )


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

    def convert(values: dict, line: int) -> tuple:
        return interaction_row(src, mapping, values, line)

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
            value = check_kind(record.get(key), key, kind)
            if key in record:
                record[key] = value
        return record_id, (record_id, record), line, json.dumps(values, ensure_ascii=False, default=str)

    required = {"id": src.id, **src.fields}
    return _dedupe(_convert_rows(src, rejects, name, required, convert), rejects, path, name)
