"""The CPRM in-context corpus: related documents packed into one row - items co-clicked for a query, queries
that led to an item, a user's item sequence, an item with its co-engaged items.

Groups are formed inside one split (a train row never holds an eval member), ranked, and greedily packed into
rows of at most `max_tokens` / `max_docs`; the log is processed in parts of whole groups, so 1M+ events fit in a
small, predictable amount of memory, and the corpus can be streamed a batch at a time (`build_in_context_stream`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import polars as pl

from recforge.data_recipes.corpus_frames import Built, IdSets, as_corpus, combined_leakage, empty_corpus, split_counts
from recforge.data_recipes.event_logs import (
    event_leakage,
    hash_chunks,
    held_out_items,
    sequence_split_rule,
    user_sequences,
    without_eval_items,
)
from recforge.data_recipes.input_frames import with_token_counts
from recforge.data_recipes.recipe_config import InContextCorpus
from recforge.data_recipes.serialize import TokenCounter
from recforge.data_recipes.splits import (
    EVAL,
    TRAIN,
    SplitConfig,
    leakage_check,
    with_hash_split,
    with_holdout_last,
    with_time_split,
)
from recforge.shards import ShardSpec
from recforge.splits import describe


def links_from_judgments(judgments: pl.DataFrame, min_grade: float) -> pl.DataFrame:
    """Positive (query, item) links from graded judgments; weight = grade."""
    return judgments.filter(pl.col("grade") >= min_grade).select(
        "query_id", "item_id", pl.col("grade").alias("weight"), pl.lit(None, dtype=pl.Float64).alias("timestamp"),
        pl.lit(None, dtype=pl.Int64).alias("line"),
    )


def links_from_interactions(events: pl.DataFrame, min_label: float | None) -> pl.DataFrame:
    """Positive (query, item) links from search logs: events that carry both a query and an item."""
    ev = events
    if events["query_id"].null_count() or events["item_id"].null_count():  # else no copy of the log
        ev = events.filter(pl.col("query_id").is_not_null() & pl.col("item_id").is_not_null())
    if min_label is not None:
        ev = ev.filter(pl.col("label") >= min_label)
    return ev.select("query_id", "item_id", pl.col("weight").fill_null(1.0), "timestamp", "line")



def group_members(links: pl.DataFrame, key: str, member: str, max_group_size: int, chunk_rows: int) -> pl.DataFrame:
    """(split, group, member_id, rank): each group's distinct members, most engaged first (then by id).

    `links` carries a `split` column; a group is formed inside one split, so a train row never
    holds an eval member. Runs per chunk of whole groups (bounded memory).
    """
    out = []
    for part in hash_chunks(links, key, chunk_rows):
        agg = (
            part.group_by(["split", key, member])
            .agg(pl.col("weight").sum().alias("w"))
            .sort(["split", key, "w", member], descending=[False, False, True, False])
            .with_columns(pl.int_range(pl.len()).over(["split", key]).alias("rank"))
            .filter(pl.col("rank") < max_group_size)
        )
        out.append(agg.select("split", pl.col(key).alias("group"), pl.col(member).alias("member_id"), "rank"))
    return pl.concat(out) if out else pl.DataFrame(
        schema={"split": pl.Utf8, "group": pl.Utf8, "member_id": pl.Utf8, "rank": pl.Int64})


def _greedy_bins(lengths: np.ndarray, new_group: np.ndarray, max_tokens: int, max_docs: int, sep_tokens: int) -> np.ndarray:
    """Greedy packing: a document starts a new row at a new group or when it would overflow the row.

    A sequential scan (the one step a columnar engine cannot express), run only over the groups that do not
    fit one row: a group whose documents and separators fit `max_tokens` and `max_docs` is one row, found with
    NumPy sums (most groups of a log: a user's sequence, a small co-click group). The first document starts a
    group. Returns each document's row number (rows numbered in document order).
    """
    n = len(lengths)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.flatnonzero(np.asarray(new_group, dtype=bool) | (np.arange(n) == 0))
    counts = np.diff(np.append(starts, n))
    totals = np.add.reduceat(lengths, starts) + sep_tokens * (counts - 1)
    group = np.repeat(np.arange(len(starts)), counts)
    local = np.zeros(n, dtype=np.int64)  # a document's row within its group
    rows = np.ones(len(starts), dtype=np.int64)  # rows per group
    for g in np.flatnonzero((totals > max_tokens) | (counts > max_docs)).tolist():
        start = int(starts[g])
        b, used, docs = -1, 0, 0
        for i, size in enumerate(lengths[start:start + counts[g]].tolist()):
            if i == 0 or docs >= max_docs or used + sep_tokens + size > max_tokens:
                b += 1
                used, docs = size, 1
            else:
                used += sep_tokens + size
                docs += 1
            local[start + i] = b
        rows[g] = b + 1
    first_row = np.cumsum(rows) - rows
    return first_row[group] + local


def pack_groups(members: pl.DataFrame, docs: pl.DataFrame, cfg: InContextCorpus, relation: str,
                sep_tokens: int) -> tuple[pl.DataFrame, int]:
    """Members (split, group, member_id, rank) + docs (id, text, n_tokens) -> in-context rows.

    Each row keeps its documents and their ids (so packing can isolate or connect them) and, in
    `meta`, the relation, the group key and the row's token count. Returns (rows, members without text).
    """
    joined = members.join(docs, left_on="member_id", right_on="id", how="inner")
    missing = members.height - joined.height
    if joined.height == 0:
        return empty_corpus(), missing
    joined = joined.sort(["split", "group", "rank"])
    new_group = (
        (pl.col("group") != pl.col("group").shift(1)) | (pl.col("split") != pl.col("split").shift(1))
    ).fill_null(True)
    flags = joined.select(new_group.alias("g"))["g"].to_numpy()
    bins = _greedy_bins(joined["n_tokens"].to_numpy(), flags, cfg.max_tokens, cfg.max_docs, sep_tokens)
    rows = (
        joined.with_columns(pl.Series("bin", bins))
        .group_by("bin", maintain_order=True)
        .agg(
            pl.col("split").first(), pl.col("group").first(),
            pl.col("member_id").alias("doc_ids"), pl.col("text").alias("documents"),
            (pl.col("n_tokens").sum() + sep_tokens * (pl.len() - 1)).alias("n_tokens"),
        )
        .filter(pl.col("doc_ids").list.len() >= cfg.min_docs)
        .with_columns(pl.int_range(pl.len()).over(["split", "group"]).alias("part"))
    )
    rows = rows.with_columns(
        pl.format("{}:{}:{}:{}", pl.lit(relation), pl.col("split"), pl.col("group"), pl.col("part")).alias("row_id"),
        pl.lit("in_context").alias("source"),
        pl.col("documents").list.join(cfg.separator).alias("text"),
        pl.struct(pl.lit(relation).alias("relation"), pl.col("group"), pl.col("n_tokens")).struct.json_encode().alias("meta"),
    )
    return as_corpus(rows), missing


def pack_in_parts(members: pl.DataFrame, docs: pl.DataFrame, cfg: InContextCorpus, relation: str, sep_tokens: int,
                  part_rows: int) -> Iterator[tuple[pl.DataFrame, int]]:
    """`pack_groups` over contiguous ranges of the sorted (split, group) keys, about `part_rows` members each.

    A row never spans two groups, so the parts' rows, concatenated, are exactly (and in the order of) the rows
    of one `pack_groups` call over all members; each part is sorted and packed on its own."""
    if members.height <= part_rows:
        yield pack_groups(members, docs, cfg, relation, sep_tokens)
        return
    keys = members.group_by(["split", "group"]).len().sort(["split", "group"])
    keys = keys.select("split", "group", ((pl.col("len").cum_sum() - pl.col("len")) // part_rows).alias("_part"))
    tagged = members.join(keys, on=["split", "group"], how="left", nulls_equal=True)
    parts = tagged.partition_by("_part", as_dict=True, include_key=False)
    del tagged, members, keys
    for key in sorted(parts):
        yield pack_groups(parts.pop(key), docs, cfg, relation, sep_tokens)


def user_parts(events: pl.DataFrame, part_rows: int) -> Iterator[pl.DataFrame]:
    """The events in parts of whole users, about `part_rows` events each, the users in sorted id order.

    Each part is a contiguous range of the sorted user ids, so the user-sequence rows built part by part are,
    per split, in the order one global sort would give them; each part is sorted on its own (linear in the
    log, where one sort of 10M events is not). Always yields at least one part (an empty log: itself)."""
    if events.height <= part_rows:
        yield events
        return
    users = events.group_by("user_id").len().sort("user_id", nulls_last=True)
    users = users.select("user_id", ((pl.col("len").cum_sum() - pl.col("len")) // part_rows).cast(pl.UInt32).alias("_part"))
    part = events.select("user_id").join(users, on="user_id", how="left", nulls_equal=True, maintain_order="left")["_part"]
    order = pl.DataFrame({"_part": part}).with_row_index("_i").sort("_part", maintain_order=True)
    del part
    sizes = order.group_by("_part").len().sort("_part")["len"].to_list()
    index = order["_i"]
    del order
    start = 0
    for size in sizes:
        yield events[index.slice(start, size)]
        start += size


def split_links(links: pl.DataFrame, member: str, split: SplitConfig) -> tuple[pl.DataFrame, str]:
    """Hash split: by the member's id (no eval entity in a train row). Time split: by the event's time.

    Returns the links with a `split` column and the method used (time needs timestamps; without any,
    e.g. for judgments, the hash split applies).
    """
    if split.by == "time" and links["timestamp"].drop_nulls().len() > 0:
        timed, cutoff = with_time_split(links, split)
        return timed, f"time (cutoff {cutoff})"
    entity = split.item_entity if member == "item_id" else "query"
    return with_hash_split(links, member, split, entity), "hash"



def sequence_members(events: pl.DataFrame, split: SplitConfig, docs: pl.DataFrame, max_tokens: int,
                     sep_tokens: int, held: pl.Series | None = None) -> tuple[pl.DataFrame, dict]:
    """User-sequence groups with the last `holdout_last` events held out.

    Train rows: each user's prefix (the held-out events never appear, nor, under a hash split, held-out
    items: `without_eval_items`). Eval rows: each held-out user's
    held-out items preceded by as much of their recent history as fits in `max_tokens` (one row per
    user, ending with what was held out). The leakage check runs on (user, position) events.
    """
    seq = with_holdout_last(events, split)
    train = without_eval_items(seq.filter(pl.col("split") == TRAIN), split, held)
    eval_users = seq.filter(pl.col("split") == EVAL).select("user_id").unique()
    evals = (
        seq.join(eval_users, on="user_id", how="semi")
        .join(docs.select("id", "n_tokens"), left_on="item_id", right_on="id", how="inner")
        .sort(["user_id", "pos"], descending=[False, True])
        .with_columns((pl.col("n_tokens") + sep_tokens).cum_sum().over("user_id").alias("_from_end"))
        .filter((pl.col("split") == EVAL) | (pl.col("_from_end") <= max_tokens + sep_tokens))
        .with_columns(pl.lit(EVAL).alias("split"))
    )
    cols = ["user_id", "item_id", "pos", "split"]
    members = pl.concat([train.select(cols), evals.select(cols)]).select(
        "split", pl.col("user_id").alias("group"), pl.col("item_id").alias("member_id"),
        pl.col("pos").cast(pl.Int64).alias("rank"),
    )
    key = pl.format("{}@{}", pl.col("user_id"), pl.col("pos"))
    leak = leakage_check(train.select(key.alias("k"))["k"], seq.filter(pl.col("split") == EVAL).select(key.alias("k"))["k"],
                         "event (user_id@position)", f"holdout_last={split.holdout_last}", sequence_split_rule(split))
    return members, leak


def build_in_context(cfg: InContextCorpus, split: SplitConfig, counter: TokenCounter, item_texts: pl.DataFrame,
                     query_texts: pl.DataFrame | None = None, judgments: pl.DataFrame | None = None,
                     interactions: pl.DataFrame | None = None, co_engagement: pl.DataFrame | None = None,
                     co_engagement_split: dict | None = None, shard: ShardSpec = ShardSpec()) -> Built:
    """CPRM in-context rows for each configured relation; relations without their inputs are reported as skipped.

    With a `shard`, each relation keeps the links / events of its own groups before grouping (a row is built
    from one group only, so a shard's rows are exactly the unsharded run's rows of its groups).
    The whole corpus in one frame: `build_in_context_stream` gives the same rows a batch at a time."""
    report: dict[str, Any] = {}
    by_relation: dict[str, list[pl.DataFrame]] = {}
    for relation, rows in iter_in_context(cfg, split, counter, item_texts, query_texts, judgments, interactions,
                                          co_engagement, co_engagement_split, shard, report):
        by_relation.setdefault(relation, []).append(rows)
    # per relation, the rows sorted by (split, group, part): parts are ranges of groups, each split in group order
    frames = [parts[0] if len(parts) == 1 else pl.concat(parts).sort("split", maintain_order=True)
              for parts in by_relation.values()]
    return Built(pl.concat(frames) if frames else empty_corpus(), report)


def build_in_context_stream(cfg: InContextCorpus, split: SplitConfig, counter: TokenCounter, item_texts: pl.DataFrame,
                            query_texts: pl.DataFrame | None = None, judgments: pl.DataFrame | None = None,
                            interactions: pl.DataFrame | None = None, co_engagement: pl.DataFrame | None = None,
                            co_engagement_split: dict | None = None, shard: ShardSpec = ShardSpec()) -> Built:
    """`build_in_context` as a stream: `batches` yields the rows part by part (each of whole groups), the report
    fills as they are consumed. Per split, the rows come in `build_in_context`'s order; a writer that routes each
    batch's rows to their split's files (`CorpusWriter`) writes exactly what `write_corpus(frame)` wrote."""
    report: dict[str, Any] = {}
    rows = iter_in_context(cfg, split, counter, item_texts, query_texts, judgments, interactions, co_engagement,
                           co_engagement_split, shard, report)
    return Built(None, report, (frame for _, frame in rows))


def iter_in_context(cfg: InContextCorpus, split: SplitConfig, counter: TokenCounter, item_texts: pl.DataFrame,
                    query_texts: pl.DataFrame | None = None, judgments: pl.DataFrame | None = None,
                    interactions: pl.DataFrame | None = None, co_engagement: pl.DataFrame | None = None,
                    co_engagement_split: dict | None = None, shard: ShardSpec = ShardSpec(),
                    report: dict[str, Any] | None = None) -> Iterator[tuple[str, pl.DataFrame]]:
    """(relation, rows) batches of the in-context corpus, relation by relation; `report` is filled as they go.

    Within a relation the batches are ranges of the sorted (split, group) keys (co-click relations: ranges of about
    `cfg.chunk_rows` members) or of the sorted user ids (`user_sequence`: about `cfg.chunk_rows` events, each
    range grouped, split, sorted and packed on its own, so memory follows the range, not the log)."""
    report = {} if report is None else report
    report.update(relations={}, splits={})
    sep_tokens = counter.count(cfg.separator)
    item_docs = with_token_counts(item_texts, counter, cfg.max_tokens)
    query_docs = with_token_counts(query_texts, counter, cfg.max_tokens) if query_texts is not None else None
    links = []
    if judgments is not None and judgments.height:
        links.append(links_from_judgments(judgments, cfg.min_grade))
    if interactions is not None and "query_id" in interactions.columns:
        links.append(links_from_interactions(interactions, cfg.min_label))
    links_df = pl.concat(links) if links else None
    if links_df is not None and links_df.height == 0:
        links_df = None

    for relation in cfg.relations:
        leak = None
        state = {"groups": 0, "leaks": []}
        if relation in ("items_by_query", "queries_by_item"):
            if links_df is None:
                report["relations"][relation] = {"skipped": "no positive (query, item) links in judgments or interactions"}
                continue
            key, member = ("query_id", "item_id") if relation == "items_by_query" else ("item_id", "query_id")
            docs = item_docs if relation == "items_by_query" else query_docs
            if docs is None:
                report["relations"][relation] = {"skipped": "no query texts (inputs.queries)"}
                continue
            split_df, method = split_links(shard.filter(links_df, key), member, split)
            members = group_members(split_df, key, member, cfg.max_group_size, cfg.chunk_rows)
            if method != "hash":
                leak = event_leakage(split_df, method)
            del split_df
            state["groups"] = members.select("split", "group").n_unique()
            parts = pack_in_parts(members, docs, cfg, relation, sep_tokens, cfg.chunk_rows)
        elif relation == "user_sequence":
            if interactions is None:
                report["relations"][relation] = {"skipped": "no interactions"}
                continue
            docs = item_docs
            parts = _user_sequence_parts(shard.filter(interactions, "user_id"), cfg, split, docs, sep_tokens, state)
        else:  # co_engaged_items
            if co_engagement is None:
                report["relations"][relation] = {"skipped": "no item-item co-engagement scores (needs interactions)"}
                continue
            docs = item_docs
            members = shard.filter(co_engaged_members(co_engagement, cfg.max_group_size), "group")
            leak = co_engagement_split
            state["groups"] = members.select("split", "group").n_unique()
            parts = pack_in_parts(members, docs, cfg, relation, sep_tokens, cfg.chunk_rows)
        members = None
        unit = "item_id" if docs is item_docs else "query_id"
        entity = split.item_entity if unit == "item_id" else "query"
        ids, counts, missing = IdSets(), {TRAIN: 0, EVAL: 0}, 0
        for rows, part_missing in parts:
            missing += part_missing
            ids.add(rows)
            for name, n in split_counts(rows).items():
                counts[name] = counts.get(name, 0) + n
            yield relation, rows
        if state["leaks"]:
            leak = combined_leakage(state["leaks"])
        report["splits"][relation] = leak or ids.leakage(unit, "hash", describe(entity, split))
        report["relations"][relation] = {"groups": state["groups"], "rows": counts, "members_without_text": missing}


def _user_sequence_parts(events: pl.DataFrame, cfg: InContextCorpus, split: SplitConfig, docs: pl.DataFrame,
                         sep_tokens: int, state: dict) -> Iterator[tuple[pl.DataFrame, int]]:
    """User-sequence rows per range of users (`user_parts`); counts groups and collects the parts' leakage
    reports (over user@position events: disjoint between parts) in `state`."""
    columns = [c for c in ("user_id", "item_id", "timestamp", "line", "label") if c in events.columns]
    held = held_out_items(events["item_id"], split) if split.by == "hash" else None
    for part in user_parts(events.select(columns), cfg.chunk_rows):
        members, leak = sequence_members(user_sequences(part, cfg.min_label), split, docs, cfg.max_tokens,
                                         sep_tokens, held)
        state["groups"] += members.select("split", "group").n_unique()
        state["leaks"].append(leak)
        yield pack_groups(members, docs, cfg, "user_sequence", sep_tokens)


def co_engaged_members(scores: pl.DataFrame, max_group_size: int) -> pl.DataFrame:
    """Group per anchor item: the anchor first, then its neighbours by co-engagement score."""
    anchors = scores.select("split", pl.col("a").alias("group"), pl.col("a").alias("member_id"),
                            pl.lit(0, dtype=pl.Int64).alias("rank")).unique()
    neighbours = (
        scores.sort(["split", "a", "score", "b"], descending=[False, False, True, False])
        .with_columns((pl.int_range(pl.len()).over(["split", "a"]) + 1).cast(pl.Int64).alias("rank"))
        .filter(pl.col("rank") < max_group_size)
        .select("split", pl.col("a").alias("group"), pl.col("b").alias("member_id"), "rank")
    )
    return pl.concat([anchors, neighbours])
