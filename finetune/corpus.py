"""Read corpus Parquet (recforge.records.corpus_schema) for training and evaluation."""

from __future__ import annotations

import random

from recforge.config import RecforgeError
from recforge.io import parquet_files

REQUIRED_COLUMNS = ("row_id", "source", "documents")


def corpus_files(path: str) -> list:
    """The Parquet files of a corpus, each checked to open and to hold the corpus columns (schema only, cheap):
    run before a model is loaded, so a bad corpus path fails in a second with one line, not after minutes."""
    import pyarrow.parquet as pq

    files = parquet_files(path, "corpus")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as err:  # pyarrow raises several types for a broken or empty file
            raise RecforgeError(f"{f}: not a readable Parquet file ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise RecforgeError(f"{f}: missing corpus column(s) {missing}; expected recforge.records.corpus_schema()")
    return files


def read_corpus(path: str, split: str | None = None, max_rows: int | None = None) -> list[dict]:
    """Rows as dicts with `row_id`, `source`, `documents`; rows of another split are skipped.

    A row without a `documents` list falls back to its `text` column as one document.
    """
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for f in corpus_files(path):
        table = pq.read_table(f)
        cols = [c for c in ("row_id", "source", "documents", "text", "split") if c in table.column_names]
        for row in table.select(cols).to_pylist():
            if split is not None and row.get("split", split) != split:
                continue
            docs = row.get("documents") or ([row["text"]] if row.get("text") else [])
            rows.append({"row_id": row["row_id"], "source": row["source"], "documents": docs})
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    if not rows:
        raise RecforgeError(f"corpus {path}: no rows" + (f" with split == {split!r}" if split else ""))
    return rows


def weighted_rows(rows: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """`weight` x the rows: whole repeats for the integer part, a random sample for the fraction."""
    whole = int(weight)
    out = rows * whole
    extra = round((weight - whole) * len(rows))
    if extra:
        out += rng.sample(rows, extra)
    return out
