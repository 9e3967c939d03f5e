"""The frames every corpus builder returns, and the split / leakage reports that go with them.

A builder (`catalogue_corpora`, `in_context`, `pair_builders`, `mix`) turns records or Polars frames into a `Built`:
a frame in the output schema - a corpus row (`CORPUS_COLUMNS`, `recforge.records.corpus_schema`) or a contrastive
pair (`PAIRS_COLUMNS`, `pairs_schema`) - with a `split` column, and a report for the manifest. This module holds
those schemas, the frame constructors, and the leakage checks over a built frame's ids (whole, or a batch at a
time: `IdSets`). It builds no corpus itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import polars as pl

from recforge.data_recipes.splits import EVAL, TRAIN, SplitConfig, leakage_check, with_hash_split
from recforge.splits import describe


CORPUS_COLUMNS = {
    "row_id": pl.Utf8, "source": pl.Utf8, "documents": pl.List(pl.Utf8), "doc_ids": pl.List(pl.Utf8),
    "text": pl.Utf8, "split": pl.Utf8, "meta": pl.Utf8,
}
PAIRS_COLUMNS = {
    "pair_id": pl.Utf8, "kind": pl.Utf8, "anchor_id": pl.Utf8, "anchor": pl.Utf8, "positive_id": pl.Utf8,
    "positive": pl.Utf8, "weight": pl.Float64, "negative_id": pl.Utf8, "negative": pl.Utf8,
    "anchor_positive_ids": pl.List(pl.Utf8), "split": pl.Utf8,
}


@dataclass
class Built:
    """A corpus frame (output columns + `split`) and what the manifest should say about it.

    A streamed corpus (`build_in_context_stream`) has no frame: `batches` yields its rows a batch at a time, in
    the corpus' row order, and `report` is complete once they have all been consumed."""

    frame: pl.DataFrame | None
    report: dict[str, Any] = field(default_factory=dict)
    batches: Iterable[pl.DataFrame] | None = None


def empty_corpus() -> pl.DataFrame:
    return pl.DataFrame(schema=CORPUS_COLUMNS)


def empty_pairs() -> pl.DataFrame:
    return pl.DataFrame(schema=PAIRS_COLUMNS)


def corpus_from_rows(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=CORPUS_COLUMNS) if rows else empty_corpus()


def as_corpus(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select([pl.col(c).cast(t) for c, t in CORPUS_COLUMNS.items()])


def as_pairs(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in PAIRS_COLUMNS.items() if c not in frame.columns]
    return frame.with_columns(missing).select([pl.col(c).cast(t) for c, t in PAIRS_COLUMNS.items()])


def split_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = {TRAIN: 0, EVAL: 0}
    for split, n in frame.group_by("split").len().iter_rows():
        counts[split] = n
    return counts


def id_leakage(frame: pl.DataFrame, id_col: str, unit: str, method: str, split_rule: str | None = None) -> dict:
    """Leakage over a list or scalar id column: eval ids that also occur in train rows (`split_rule` names the rule)."""
    col = pl.col(id_col)
    ids = frame.select(pl.col("split"), col.alias("id"))
    if isinstance(frame.schema[id_col], pl.List):
        ids = ids.explode("id")
    train = ids.filter(pl.col("split") == TRAIN).get_column("id").drop_nulls()
    evals = ids.filter(pl.col("split") == EVAL).get_column("id").drop_nulls()
    return leakage_check(train, evals, unit, method, split_rule)


def hash_leakage(frame: pl.DataFrame, id_col: str, unit: str, split: SplitConfig, entity: str) -> dict:
    return id_leakage(frame, id_col, unit, "hash", describe(entity, split))


class IdSets:
    """`id_leakage` over a corpus seen a batch at a time: the distinct train and eval ids, kept (ids, not rows)."""

    def __init__(self, id_col: str = "doc_ids"):
        self.id_col = id_col
        self.parts: dict[str, list[pl.Series]] = {TRAIN: [], EVAL: []}

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        ids = frame.select(pl.col("split"), pl.col(self.id_col).alias("id"))
        if isinstance(frame.schema[self.id_col], pl.List):
            ids = ids.explode("id")
        for split, parts in self.parts.items():
            parts.append(ids.filter(pl.col("split") == split).get_column("id").drop_nulls().unique())
            if len(parts) > 64:  # bounded by the distinct ids, not by the batches seen
                self.parts[split] = [pl.concat(parts).unique()]

    def distinct(self, split: str) -> pl.Series:
        parts = self.parts[split]
        return pl.concat(parts).unique() if parts else pl.Series("id", [], dtype=pl.Utf8)

    def leakage(self, unit: str, method: str, split_rule: str | None = None) -> dict:
        return leakage_check(self.distinct(TRAIN), self.distinct(EVAL), unit, method, split_rule)


def combined_leakage(reports: list[dict]) -> dict:
    """`leakage_check` reports of disjoint parts (ids of one part never occur in another) -> the whole's report."""
    first = reports[0]
    leaked = [x for r in reports for x in r["leaked_examples"]]
    out = {"unit": first["unit"], "method": first["method"],
           "train_ids": sum(r["train_ids"] for r in reports), "eval_ids": sum(r["eval_ids"] for r in reports),
           "eval_ids_in_train": sum(r["eval_ids_in_train"] for r in reports), "leaked_examples": leaked[:5],
           "ok": all(r["ok"] for r in reports)}
    if "split" in first:
        out["split"] = first["split"]
    return out



def row_meta(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False, sort_keys=True)


def hash_splits(ids: list[str], split: SplitConfig, entity: str) -> dict[str, str]:
    frame = with_hash_split(pl.DataFrame({"id": ids}, schema={"id": pl.Utf8}), "id", split, entity)
    return dict(zip(frame["id"].to_list(), frame["split"].to_list()))
