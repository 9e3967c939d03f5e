"""Train / eval splits without leakage, and the check the manifest reports.

Three ways to split, each fitted to a kind of corpus:

- by id hash (`by: hash`): each entity (item, query, user) lands in `eval` when a seeded, version-stable
  hash of its id falls under `eval_fraction`. Rows that hold several entities (an in-context group, an
  item-item pair) are built *inside* one split, so no eval id ever appears in a train row.
- by time (`by: time`): interaction events after `time_cutoff` (default: the `1 - eval_fraction`
  quantile of the timestamps) are eval; train rows are built from earlier events only.
- user sequences: each user's last `holdout_last` interactions are held out (leave-last-out), the
  prefix stays in train.

`leakage_check` compares the ids actually present in the train rows with the eval ids and reports how
many eval ids leaked (0 when the split is sound); the build writes that report per corpus to the manifest.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Literal

import polars as pl
from pydantic import Field

from recforge.config import RecipeModel

TRAIN, EVAL = "train", "eval"


class SplitConfig(RecipeModel):
    by: Literal["hash", "time"] = Field(
        default="hash", description="hash: split entities by id hash; time: split interaction events at a cutoff"
    )
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0
    time_cutoff: float | None = Field(
        default=None, description="by=time: events with timestamp > cutoff are eval (default: a quantile)"
    )
    holdout_last: int = Field(default=1, ge=0, description="user sequences: last N interactions of a user held out")
    min_train_events: int = Field(
        default=1, ge=1, description="users with fewer than holdout_last + this events are kept wholly in train"
    )


def hash_fraction(entity_id: str, seed: int) -> float:
    """A number in [0, 1) from the id alone (blake2b; identical across machines, Python and Polars versions)."""
    digest = hashlib.blake2b(f"{seed}\x1f{entity_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_split(ids: Iterable[str], config: SplitConfig) -> pl.DataFrame:
    """Frame (id, split) over the distinct ids. Hashes once per distinct id, not per row."""
    unique = pl.Series("id", list(ids), dtype=pl.Utf8).unique(maintain_order=True).drop_nulls()
    fractions = [hash_fraction(i, config.seed) for i in unique.to_list()]
    split = pl.Series("split", fractions) < config.eval_fraction
    return pl.DataFrame({"id": unique, "split": split}).with_columns(
        pl.when(pl.col("split")).then(pl.lit(EVAL)).otherwise(pl.lit(TRAIN)).alias("split")
    )


def with_hash_split(frame: pl.DataFrame, column: str, config: SplitConfig) -> pl.DataFrame:
    """Add a `split` column by hashing `frame[column]`."""
    splits = hash_split(frame.get_column(column).unique().to_list(), config).rename({"id": column})
    return frame.join(splits, on=column, how="left")


def time_cutoff(timestamps: pl.Series, config: SplitConfig) -> float:
    if config.time_cutoff is not None:
        return float(config.time_cutoff)
    value = timestamps.drop_nulls().quantile(1.0 - config.eval_fraction, interpolation="lower")
    return float(value) if value is not None else float("inf")


def with_time_split(events: pl.DataFrame, config: SplitConfig, time_col: str = "timestamp") -> tuple[pl.DataFrame, float]:
    """Events after the cutoff are eval. Events without a timestamp cannot be placed in time: they stay train."""
    cutoff = time_cutoff(events.get_column(time_col), config)
    split = pl.when(pl.col(time_col) > cutoff).then(pl.lit(EVAL)).otherwise(pl.lit(TRAIN))
    return events.with_columns(split.alias("split")), cutoff


def with_holdout_last(events: pl.DataFrame, config: SplitConfig, user_col: str = "user_id",
                      order_cols: tuple[str, ...] = ("timestamp", "line")) -> pl.DataFrame:
    """Per user (events in time order), the last `holdout_last` events are eval; adds `pos` and `n_events`.

    Users with fewer than `holdout_last + min_train_events` events keep everything in train: a held-out
    event with no history before it cannot be predicted from anything.
    """
    order = [c for c in order_cols if c in events.columns]
    events = events.sort([user_col, *order], nulls_last=True)
    events = events.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over(user_col).alias("pos"),
        pl.len().over(user_col).cast(pl.Int64).alias("n_events"),
    )
    held = (pl.col("n_events") >= config.holdout_last + config.min_train_events) & (
        pl.col("pos") >= pl.col("n_events") - config.holdout_last
    )
    return events.with_columns(pl.when(held).then(pl.lit(EVAL)).otherwise(pl.lit(TRAIN)).alias("split"))


def leakage_check(train_ids: pl.Series | Iterable[str], eval_ids: pl.Series | Iterable[str], unit: str,
                  method: str) -> dict:
    """How many eval ids also occur in train rows (0 means no leakage)."""
    train = pl.Series("id", train_ids, dtype=pl.Utf8).unique() if not isinstance(train_ids, pl.Series) else train_ids.unique()
    evals = pl.Series("id", eval_ids, dtype=pl.Utf8).unique() if not isinstance(eval_ids, pl.Series) else eval_ids.unique()
    leaked = evals.filter(evals.is_in(train.implode()))
    return {
        "unit": unit,
        "method": method,
        "train_ids": train.len(),
        "eval_ids": evals.len(),
        "eval_ids_in_train": leaked.len(),
        "leaked_examples": leaked.head(5).to_list(),
        "ok": leaked.len() == 0,
    }
