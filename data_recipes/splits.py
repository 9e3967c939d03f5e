"""Train / eval splits of the data recipes, and the check the manifest reports.

Three ways to split, each fitted to a kind of corpus:

- by id hash (`by: hash`): each entity (item, query, user) is split by the project's one rule,
  `recforge.splits` (salt + per-entity percent, the same rule align, finetune and generate use). Rows that
  hold several entities (an in-context group, an item-item pair) are built *inside* one split, so no eval
  id ever appears in a train row.
- by time (`by: time`): interaction events after `time_cutoff` (default: the `1 - time_eval_percent/100`
  quantile of the timestamps) are eval; train rows are built from earlier events only.
- user sequences: each user's last `holdout_last` interactions are held out (leave-last-out), the
  prefix stays in train.

`leakage_check` compares the ids actually present in the train rows with the eval ids and reports how
many eval ids leaked (0 when the split is sound); the build writes that report per corpus to the manifest.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from recforge.splits import EVAL, TRAIN, SplitRule, leakage_check, split_frame  # noqa: F401 (re-exported)


class SplitConfig(SplitRule):
    """The project split rule (`salt`, `eval_percent` per entity) plus the data recipes' time / sequence splits."""

    by: Literal["hash", "time"] = Field(
        default="hash", description="hash: split entities by id hash; time: split interaction events at a cutoff"
    )
    item_entity: Literal["item", "book"] = Field(
        default="item", description="the entity type of inputs.items ids: `book` for goodbooks, so generate agrees"
    )
    time_eval_percent: float = Field(default=10.0, ge=0.0, lt=100.0, description="by=time: share of events after the default cutoff")
    time_cutoff: float | None = Field(
        default=None, allow_inf_nan=False, description="by=time: events with timestamp > cutoff are eval (default: a quantile)"
    )
    holdout_last: int = Field(default=1, ge=0, description="user sequences: last N interactions of a user held out")
    min_train_events: int = Field(
        default=1, ge=1, description="users with fewer than holdout_last + this events are kept wholly in train"
    )


def with_hash_split(frame: pl.DataFrame, column: str, config: SplitConfig, entity: str) -> pl.DataFrame:
    """Add a `split` column by the project rule on `frame[column]`, read as ids of `entity`."""
    splits = split_frame(frame.get_column(column).unique().to_list(), entity, config).rename({"id": column})
    return frame.join(splits, on=column, how="left")


def time_cutoff(timestamps: pl.Series, config: SplitConfig) -> float:
    if config.time_cutoff is not None:
        return float(config.time_cutoff)
    value = timestamps.drop_nulls().quantile(1.0 - config.time_eval_percent / 100.0, interpolation="lower")
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
