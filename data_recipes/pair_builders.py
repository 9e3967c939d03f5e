"""Contrastive pairs for align: query -> item (with hard negatives), item -> item (NoteLLM co-engagement
weights), user history -> item, item / user -> tag.

Each pair carries `anchor_positive_ids` (every known positive of its anchor, for in-batch masking) and a `split`
(by the anchor's id hash, the user's held-out last events, or time). The co-engagement scores are also the
input of the in-context `co_engaged_items` relation (`build.iter_corpora` computes them once for both).
"""

from __future__ import annotations

import polars as pl

from recforge.data_recipes.corpus_frames import Built, as_pairs, empty_pairs, hash_leakage
from recforge.data_recipes.event_logs import (
    event_leakage,
    hash_chunks,
    sequence_split_rule,
    user_sequences,
    without_eval_items,
)
from recforge.data_recipes.recipe_config import ItemItemPairs, QueryItemPairs, TagPairs, UserItemPairs
from recforge.data_recipes.splits import (
    EVAL,
    TRAIN,
    SplitConfig,
    leakage_check,
    with_hash_split,
    with_holdout_last,
    with_time_split,
)
from recforge.records import Item


def build_query_item_pairs(queries: pl.DataFrame, judgments: pl.DataFrame, item_texts: pl.DataFrame,
                           cfg: QueryItemPairs, split: SplitConfig, seed: int) -> Built:
    """query -> each positive item; a hard negative from the query's judged-irrelevant items when there is one.

    A negative is never one of the query's positives (at any grade >= min_grade) nor the anchor itself.
    """
    pos = judgments.filter(pl.col("grade") >= cfg.min_grade)
    anchor_pos = pos.group_by("query_id").agg(pl.col("item_id").unique().sort().alias("anchor_positive_ids"))
    pairs = (
        pos.join(queries.rename({"id": "query_id", "text": "anchor"}), on="query_id", how="inner")
        .join(item_texts.rename({"id": "item_id", "text": "positive"}), on="item_id", how="inner")
        .join(anchor_pos, on="query_id", how="left")
        .sort(["query_id", "grade", "item_id"], descending=[False, True, False])
    )
    if cfg.hard_negatives:
        negs = (
            judgments.filter(pl.col("grade") <= cfg.negative_max_grade)
            .join(pos.select("query_id", "item_id"), on=["query_id", "item_id"], how="anti")
            .filter(pl.col("item_id") != pl.col("query_id"))
            .join(item_texts.rename({"id": "item_id"}), on="item_id", how="inner")
            .sort(["query_id", "item_id"])
            .group_by("query_id", maintain_order=True)
            .agg(pl.col("item_id").shuffle(seed=seed).alias("neg_ids"), pl.col("text").shuffle(seed=seed).alias("neg_texts"))
        )
        pairs = pairs.join(negs, on="query_id", how="left").with_columns(
            pl.int_range(pl.len()).over("query_id").alias("_k")
        ).with_columns(
            pl.col("neg_ids").list.get(pl.col("_k") % pl.col("neg_ids").list.len(), null_on_oob=True).alias("negative_id"),
            pl.col("neg_texts").list.get(pl.col("_k") % pl.col("neg_texts").list.len(), null_on_oob=True).alias("negative"),
        )
    pairs = with_hash_split(pairs, "query_id", split, "query").with_columns(
        pl.format("qi:{}:{}", pl.col("query_id"), pl.col("item_id")).alias("pair_id"),
        pl.lit("query_item").alias("kind"),
        pl.col("query_id").alias("anchor_id"),
        pl.col("item_id").alias("positive_id"),
        pl.lit(1.0).alias("weight"),
    )
    frame = as_pairs(pairs)
    report = {"split": hash_leakage(frame, "anchor_id", "query_id", split, "query"),
              "with_hard_negative": int(frame["negative_id"].is_not_null().sum())}
    return Built(frame, report)


def co_engagement_scores(events: pl.DataFrame, cfg: ItemItemPairs, split: SplitConfig,
                         chunk_rows: int = 2_000_000) -> tuple[pl.DataFrame, dict]:
    """NoteLLM co-occurrence: score(a, b) = sum over users u who engaged both of 1 / n_u.

    n_u = the number of distinct items user u engaged (within the split), so heavy users do not
    dominate. Pairs are within `window` positions of each other in the user's time order (None = any),
    counted both ways (a->b and b->a); scores outside [min_score, max_score] are dropped; the top_k
    per anchor are kept. Hash split: both items must be in the same split. Time split: train scores
    come from events before the cutoff only. Returns (split, a, b, score, users) and a report.
    """
    seq = user_sequences(events, cfg.min_label)
    leak = None
    if split.by == "time" and seq["timestamp"].drop_nulls().len() > 0:
        seq, cutoff = with_time_split(seq, split)
        method = f"time (cutoff {cutoff})"
        leak = event_leakage(seq, method)
    else:
        seq, method = with_hash_split(seq, "item_id", split, split.item_entity), "hash"
    seq = seq.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over(["user_id", "split"]).alias("pos"),
        pl.len().over(["user_id", "split"]).cast(pl.Int64).alias("n"),
    ).filter(pl.col("pos") >= pl.col("n") - cfg.max_items_per_user)
    seq = seq.select("user_id", "split", "item_id", "pos", (1.0 / pl.col("n")).alias("w"))

    partials = []
    for part in hash_chunks(seq, "user_id", chunk_rows):
        if cfg.window is not None:
            shifted = [
                part.with_columns(pl.col("item_id").shift(-d).over(["user_id", "split"]).alias("b"))
                .filter(pl.col("b").is_not_null()).select("split", pl.col("item_id").alias("a"), "b", "w")
                for d in range(1, cfg.window + 1)
            ]
            pairs = pl.concat(shifted)
        else:
            pairs = (
                part.join(part, on=["user_id", "split"], suffix="_b")
                .filter(pl.col("pos_b") > pl.col("pos"))
                .select("split", pl.col("item_id").alias("a"), pl.col("item_id_b").alias("b"), "w")
            )
        both = pl.concat([pairs, pairs.select("split", pl.col("b").alias("a"), pl.col("a").alias("b"), "w")])
        partials.append(both.group_by(["split", "a", "b"]).agg(pl.col("w").sum().alias("score"), pl.len().alias("users")))
    if not partials:
        empty = pl.DataFrame(schema={"split": pl.Utf8, "a": pl.Utf8, "b": pl.Utf8, "score": pl.Float64, "users": pl.UInt32})
        return empty, {"method": method, "pairs_before_filter": 0, "split": leak}
    scores = pl.concat(partials).group_by(["split", "a", "b"]).agg(pl.col("score").sum(), pl.col("users").sum())
    before = scores.height
    scores = scores.filter(pl.col("score").is_between(cfg.min_score, cfg.max_score))
    in_range = scores.height
    scores = (
        scores.sort(["split", "a", "score", "b"], descending=[False, False, True, False])
        .with_columns(pl.int_range(pl.len()).over(["split", "a"]).alias("_r"))
        .filter(pl.col("_r") < cfg.top_k).drop("_r")
    )
    return scores, {"method": method, "pairs_before_filter": before, "pairs_in_score_range": in_range,
                    "pairs_after_top_k": scores.height, "split": leak}


def build_item_item_pairs(scores: pl.DataFrame, item_texts: pl.DataFrame, time_leakage: dict | None = None,
                          split: SplitConfig | None = None) -> Built:
    """Pairs from co-engagement scores: weight = the NoteLLM score; anchor_positive_ids = all kept neighbours.

    Hash split: the leakage check is on item ids (anchor and positive). Time split: pass the event
    check of `co_engagement_scores` (items recur across time by design; events must not).
    """
    positives = scores.group_by(["split", "a"]).agg(pl.col("b").sort().alias("anchor_positive_ids"))
    pairs = (
        scores.join(positives, on=["split", "a"], how="left")
        .join(item_texts.rename({"id": "a", "text": "anchor"}), on="a", how="inner")
        .join(item_texts.rename({"id": "b", "text": "positive"}), on="b", how="inner")
        .sort(["split", "a", "score", "b"], descending=[False, False, True, False])
        .with_columns(
            pl.format("ii:{}:{}", pl.col("a"), pl.col("b")).alias("pair_id"), pl.lit("item_item").alias("kind"),
            pl.col("a").alias("anchor_id"), pl.col("b").alias("positive_id"), pl.col("score").alias("weight"),
        )
    )
    frame = as_pairs(pairs)
    if time_leakage is not None:
        return Built(frame, {"split": time_leakage})
    ids = pl.concat([frame.select("split", pl.col("anchor_id").alias("id")), frame.select("split", pl.col("positive_id").alias("id"))])
    split = split or SplitConfig()
    return Built(frame, {"split": hash_leakage(ids, "id", "item_id", split, split.item_entity)})


def _short_text(items: list[Item], field_name: str | None, item_texts: pl.DataFrame) -> pl.DataFrame:
    if field_name is None:
        return item_texts.rename({"text": "short"})
    return pl.DataFrame(
        {"id": [it.item_id for it in items],
         "short": [str(it.fields.get(field_name)) if it.fields.get(field_name) is not None else None for it in items]},
        schema={"id": pl.Utf8, "short": pl.Utf8},
    ).drop_nulls()


def build_user_item_pairs(events: pl.DataFrame, items: list[Item], item_texts: pl.DataFrame,
                          cfg: UserItemPairs, split: SplitConfig) -> Built:
    """User history (the last `history_len` items before t, oldest first) -> the item at t.

    Train pairs use each user's prefix only, without held-out items (hash split); the last `holdout_last`
    items of each user are the eval targets (their history may include train items, never the reverse).
    """
    short = _short_text(items, cfg.history_field, item_texts)
    seq = user_sequences(events, cfg.min_label).join(short, left_on="item_id", right_on="id", how="inner")
    seq = without_eval_items(with_holdout_last(seq, split), split)
    # train rows list the user's train items as known positives; eval rows list every item of the user
    own_train = seq.filter(pl.col("split") == TRAIN).group_by("user_id").agg(
        pl.col("item_id").unique().sort().alias("_train"))
    own_all = seq.group_by("user_id").agg(pl.col("item_id").unique().sort().alias("_all"))
    hist = [pl.col("short").shift(k).over("user_id") for k in range(cfg.history_len, 0, -1)]
    seq = seq.with_columns(pl.concat_list(hist).list.drop_nulls().alias("history"))
    seq = seq.filter(pl.col("history").list.len() >= cfg.min_history)
    seq = seq.with_columns(pl.int_range(pl.len(), 0, -1).over(["user_id", "split"]).alias("_from_end"))
    seq = seq.filter((pl.col("split") == EVAL) | (pl.col("_from_end") <= cfg.max_pairs_per_user))
    seq = seq.join(own_train, on="user_id", how="left").join(own_all, on="user_id", how="left").with_columns(
        pl.when(pl.col("split") == EVAL).then(pl.col("_all")).otherwise(pl.col("_train")).alias("anchor_positive_ids")
    )
    pairs = seq.join(item_texts.rename({"id": "item_id", "text": "positive"}), on="item_id", how="inner").with_columns(
        pl.format("ui:{}:{}", pl.col("user_id"), pl.col("pos")).alias("pair_id"), pl.lit("user_item").alias("kind"),
        pl.col("user_id").alias("anchor_id"),
        (pl.lit("History: ") + pl.col("history").list.join(" | ")).alias("anchor"),
        pl.col("item_id").alias("positive_id"), pl.lit(1.0).alias("weight"),
    )
    frame = as_pairs(pairs)
    # leakage: every (user, position) a train pair touches (its target and its history) vs the held-out events
    used = pairs.filter(pl.col("split") == TRAIN).select(
        "user_id", pl.int_ranges(pl.col("pos") - pl.col("history").list.len(), pl.col("pos") + 1).alias("p")
    ).explode("p").select(pl.format("{}@{}", "user_id", "p").alias("k"))["k"]
    held = pairs.filter(pl.col("split") == EVAL).select(pl.format("{}@{}", "user_id", "pos").alias("k"))["k"]
    leak = leakage_check(used, held, "event (user_id@position)", f"holdout_last={split.holdout_last}", sequence_split_rule(split))
    return Built(frame, {"split": leak})


def top_item_tags(tags: pl.DataFrame, cfg: TagPairs) -> pl.DataFrame:
    kept = tags.filter(~pl.col("tag").is_in(pl.Series(cfg.exclude, dtype=pl.Utf8).implode()))
    return (
        kept.sort(["item_id", "count", "rank"], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over("item_id").alias("_r"))
        .filter(pl.col("_r") < cfg.top_k).drop("_r")
    )


def build_tag_pairs(tags: pl.DataFrame, item_texts: pl.DataFrame, cfg: TagPairs, split: SplitConfig,
                    events: pl.DataFrame | None = None, items: list[Item] | None = None,
                    history_field: str | None = "title", history_len: int = 10) -> Built:
    """item -> each of its top tags; user (their history) -> each of their top tags.

    A user's tag score = the number of their items carrying the tag among those items' top tags.
    Split units: item ids for item pairs, user ids for user pairs (by id hash).
    """
    top = top_item_tags(tags, cfg)
    frames, report = [], {}
    if cfg.items:
        own = top.group_by("item_id").agg(pl.col("tag").sort().alias("anchor_positive_ids"))
        pairs = (
            top.join(item_texts.rename({"id": "item_id", "text": "anchor"}), on="item_id", how="inner")
            .join(own, on="item_id", how="left")
        )
        pairs = with_hash_split(pairs, "item_id", split, split.item_entity).with_columns(
            pl.format("it:{}:{}", pl.col("item_id"), pl.col("tag")).alias("pair_id"), pl.lit("item_tag").alias("kind"),
            pl.col("item_id").alias("anchor_id"), pl.col("tag").alias("positive_id"), pl.col("tag").alias("positive"),
            pl.col("count").alias("weight"),
        )
        frame = as_pairs(pairs)
        report["item_tag"] = hash_leakage(frame, "anchor_id", "item_id", split, split.item_entity)
        frames.append(frame)
    if cfg.users and events is not None and items is not None:
        seq = without_eval_items(user_sequences(events), split)  # a user's tags and history: train items only
        user_tags = (
            seq.join(top.select("item_id", "tag"), on="item_id", how="inner")
            .group_by(["user_id", "tag"]).agg(pl.len().cast(pl.Float64).alias("score"))
            .sort(["user_id", "score", "tag"], descending=[False, True, False])
            .with_columns(pl.int_range(pl.len()).over("user_id").alias("_r"))
            .filter(pl.col("_r") < cfg.top_k).drop("_r")
        )
        short = _short_text(items, history_field, item_texts)
        history = (
            seq.join(short, left_on="item_id", right_on="id", how="inner")
            .group_by("user_id", maintain_order=True).agg(pl.col("short").tail(history_len).alias("h"))
            .select("user_id", (pl.lit("History: ") + pl.col("h").list.join(" | ")).alias("anchor"))
        )
        own = user_tags.group_by("user_id").agg(pl.col("tag").sort().alias("anchor_positive_ids"))
        pairs = user_tags.join(history, on="user_id", how="inner").join(own, on="user_id", how="left")
        pairs = with_hash_split(pairs, "user_id", split, "user").with_columns(
            pl.format("ut:{}:{}", pl.col("user_id"), pl.col("tag")).alias("pair_id"), pl.lit("user_tag").alias("kind"),
            pl.col("user_id").alias("anchor_id"), pl.col("tag").alias("positive_id"), pl.col("tag").alias("positive"),
            pl.col("score").alias("weight"),
        )
        frame = as_pairs(pairs)
        report["user_tag"] = hash_leakage(frame, "anchor_id", "user_id", split, "user")
        frames.append(frame)
    return Built(pl.concat(frames) if frames else empty_pairs(), report)
