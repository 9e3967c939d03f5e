"""generate-export's features table (`recforge.records.features_schema()`): its one reader, for every stage.

A Parquet file, a folder of them, or a JSONL[.gz] file -> a pyarrow Table, checked as one unit: a table that does
not open, lacks a required column or has the wrong type of list column is a one-line error naming the recipe key
(not rejects).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from recforge.config import RecforgeError
from recforge.file_rows import Format
from recforge.io import parquet_files


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

    tables = [_features_file(f, key, fmt) for f in parquet_files(path, f"{key}:", recursive=True)]
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
