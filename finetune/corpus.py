"""Read corpus Parquet (recforge.records.corpus_schema) for training and evaluation.

A corpus written by a recforge run (`recforge data`) is read only once that run finished: a killed or still
running producer is refused with one line (`recforge.runstate.require_complete`), unless the consumer was run
with `--allow-partial`, which says so in its own manifest.
"""

from __future__ import annotations

import random

from recforge.config import RecforgeError
from recforge.io import parquet_files, resolve_path
from recforge.runstate import require_complete

REQUIRED_COLUMNS = ("row_id", "source", "documents")


def check_finished(path: str, allow_partial: bool = False) -> str | None:
    """Refuse a corpus whose producing run did not finish; with `allow_partial` return the note to record."""
    return require_complete(resolve_path(path), "corpus", allow_partial)


def corpus_files(path: str, allow_partial: bool = False) -> list:
    """The Parquet files of a corpus, each checked to open and to hold the corpus columns (schema only, cheap):
    run before a model is loaded, so a bad corpus path fails in a second with one line, not after minutes.
    An unfinished producer is refused here too (`allow_partial`: the caller checked and recorded it)."""
    import pyarrow.parquet as pq

    if not allow_partial:
        check_finished(path)
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


def read_corpus(path: str, split: str | None = None, max_rows: int | None = None,
                allow_partial: bool = False) -> list[dict]:
    """Rows as dicts with `row_id`, `source`, `documents`; rows of another split are skipped.

    With a `split`, a file without a split column or a row without a split value is refused (one line naming the
    corpus): such rows cannot be told apart, and taking them for any split would put training rows into held-out
    perplexity. `split=None` reads every row. A row without a `documents` list falls back to its `text` column.
    """
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for f in corpus_files(path, allow_partial):
        table = pq.read_table(f)
        if split is not None and "split" not in table.column_names:
            raise RecforgeError(f"corpus {path}: {f.name} has no split column, so its {split!r} rows cannot be told "
                                "apart; set this source's split: null to read every row")
        cols = [c for c in ("row_id", "source", "documents", "text", "split") if c in table.column_names]
        for row in table.select(cols).to_pylist():
            if split is not None and row_split(row, path, f) != split:
                continue
            docs = row.get("documents") or ([row["text"]] if row.get("text") else [])
            rows.append({"row_id": row["row_id"], "source": row["source"], "documents": docs})
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    if not rows:
        raise RecforgeError(f"corpus {path}: no rows" + (f" with split == {split!r}" if split else ""))
    return rows


def row_split(row: dict, path: str, f) -> str:
    if not row.get("split"):
        raise RecforgeError(f"corpus {path}: row {row.get('row_id')!r} of {f.name} has no split value; "
                            "give every row one, or set this source's split: null to read every row")
    return row["split"]


def weighted_rows(rows: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """`weight` x the rows (2.0: twice as many rows as the file holds, 0.3: a random 30%), picked by the project's
    one mixing rule (`recforge.mixing`, which `recforge data`'s mix uses too): `rows_for_weight` rows, `take`n
    with a seed drawn from `rng` - each row at most once up to the file's rows; beyond, every row as many whole
    times as the weight says plus a sample for the fraction.

    In passes over the file: first every row taken, in file order, then every row taken twice, and so on (weight
    1.0 is the file itself, in order)."""
    import polars as pl

    from recforge.mixing import rows_for_weight, take

    if not rows:
        return []
    taken = take(len(rows), rows_for_weight(len(rows), weight), rng.getrandbits(32)).to_frame()
    taken = taken.with_columns(pl.int_range(pl.len()).over("_pos").alias("_pass")).sort(["_pass", "_pos"])
    return [rows[i] for i in taken["_pos"].to_list()]
