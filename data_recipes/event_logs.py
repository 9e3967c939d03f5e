"""Interaction logs as the builders read them: each user's item sequence, the held-out items a train row may
not hold, log chunks of whole groups (bounded memory), and the split reports over events.

Shared by the in-context corpus (`in_context`: user sequences, co-click groups) and the pairs built from
behaviour (`pair_builders`: co-engagement, user -> item, user -> tag). Everything is Polars group-bys / joins.
"""

from __future__ import annotations

import math
from typing import Iterator

import polars as pl

from recforge.data_recipes.splits import EVAL, TRAIN, SplitConfig, leakage_check
from recforge.splits import describe, split_frame


def hash_chunks(frame: pl.DataFrame, key: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """Partition by a hash of `key` so each part holds whole groups and about `chunk_rows` rows.

    One part at a time (gathered through one stable sort of the part numbers; parts in the order of their first
    row, rows in frame order: the parts `partition_by` would give), so the log is not copied into all its parts
    at once."""
    n = max(1, math.ceil(frame.height / chunk_rows))
    if n == 1:
        yield frame
        return
    chunk = frame.get_column(key).hash(seed=17) % n
    order = pl.DataFrame({"_chunk": chunk}).with_row_index("_i").sort("_chunk", maintain_order=True)
    sizes = order.group_by("_chunk").len()
    sizes = sizes.sort("_chunk").with_columns((pl.col("len").cum_sum() - pl.col("len")).alias("_start"))
    where = {k: (start, size) for k, size, start in sizes.iter_rows()}
    index = order["_i"]
    del order, sizes
    for k in chunk.unique(maintain_order=True).to_list():
        start, size = where[k]
        yield frame[index.slice(start, size)]



def event_leakage(events: pl.DataFrame, method: str) -> dict:
    """Time split: the events feeding train rows vs those feeding eval rows (by source line)."""
    ids = events.select("split", pl.col("line").cast(pl.Utf8).alias("id")).drop_nulls()
    return leakage_check(ids.filter(pl.col("split") == TRAIN)["id"], ids.filter(pl.col("split") == EVAL)["id"],
                         "event (source line)", method)


def user_sequences(events: pl.DataFrame, min_label: float | None = None) -> pl.DataFrame:
    """Each user's distinct items in time order (first occurrence kept): user_id, item_id, timestamp, line."""
    ev = events.filter(pl.col("item_id").is_not_null())
    if min_label is not None:
        ev = ev.filter(pl.col("label") >= min_label)
    ev = ev.sort(["user_id", "timestamp", "line"], nulls_last=True)
    return ev.unique(["user_id", "item_id"], keep="first", maintain_order=True).select(
        "user_id", "item_id", "timestamp", "line")


def held_out_items(item_ids: pl.Series, split: SplitConfig) -> pl.Series:
    """The held-out ones (by the project rule) of these item ids."""
    ids = item_ids.drop_nulls().unique().to_list()
    return split_frame(ids, split.item_entity, split).filter(pl.col("split") == EVAL)["id"]


def without_eval_items(seq: pl.DataFrame, split: SplitConfig, held: pl.Series | None = None) -> pl.DataFrame:
    """Under a hash split a train row never holds an eval entity, user sequences included: the events of
    held-out items (by the project rule) leave the train side. Rows marked `split == eval` keep them.
    `held`: the held-out ids of a superset of seq's items, when known (hashed once for a whole log)."""
    if split.by != "hash" or seq.height == 0:
        return seq
    if held is None:
        held = held_out_items(seq["item_id"], split)
    keep = ~pl.col("item_id").is_in(held.implode())
    if "split" in seq.columns:
        keep = keep | (pl.col("split") == EVAL)
    return seq.filter(keep)


def sequence_split_rule(split: SplitConfig) -> str:
    """The split of user-sequence rows, in words, for the leakage report."""
    held = f"; held-out items ({describe(split.item_entity, split)}) never in a train row" if split.by == "hash" else ""
    return f"each user's last {split.holdout_last} event(s) held out{held}"
