"""Corpus builders: records -> corpus rows (`corpus_schema`) or contrastive pairs (`pairs_schema`).

Each builder takes in-memory records / Polars frames and a recipe section and returns a `Built`
(a Polars frame in the output schema, with a `split` column, and a report for the manifest).
Catalogue-sized work (serialising each item once) is a plain loop; everything over interaction
logs (co-click groups, co-engagement counts, user sequences) is Polars group-bys / joins, run over
bounded chunks of the log, so 1M+ events fit in a small, predictable amount of memory.

Builders:
- `build_items`, `build_queries`, `build_query_item`, `build_field_targets`: CPRM joint pre-training
  (+ LARR field -> field targets);
- `build_in_context`: CPRM in-context rows (co-click groups, user sequences, co-engaged items);
- `build_reading`: CPRM reading comprehension (item text + generated knowledge);
- `build_query_item_pairs`, `build_item_item_pairs` (NoteLLM weights), `build_user_item_pairs`,
  `build_tag_pairs`: contrastive pairs for align, each with `anchor_positive_ids` for masking;
- `mix_corpora`: weighted, seeded interleaving, replay corpus included.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import polars as pl

from recforge.config import RecforgeError
from recforge.data_recipes.recipe_config import (
    FieldTargetsCorpus,
    InContextCorpus,
    ItemItemPairs,
    MixCorpus,
    QueryItemCorpus,
    QueryItemPairs,
    ReadingCorpus,
    TagPairs,
    UserItemPairs,
)
from recforge.data_recipes.serialize import Serializer, TokenCounter
from recforge.data_recipes.splits import (
    EVAL,
    TRAIN,
    SplitConfig,
    leakage_check,
    with_hash_split,
    with_holdout_last,
    with_time_split,
)
from recforge.records import Item, Judgment, Query
from recforge.shards import ShardSpec
from recforge.splits import describe, split_frame

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


def _hash_leakage(frame: pl.DataFrame, id_col: str, unit: str, split: SplitConfig, entity: str) -> dict:
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


# ---------------------------------------------------------------- texts


def item_text_frame(items: list[Item], serializer: Serializer) -> pl.DataFrame:
    """(id, text) per item, every configured field, no dropout (the texts pairs and groups share)."""
    return pl.DataFrame(
        {"id": [it.item_id for it in items], "text": [serializer.serialize(it, dropout=False) for it in items]},
        schema={"id": pl.Utf8, "text": pl.Utf8},
    ).filter(pl.col("text") != "")


def query_text_frame(queries: list[Query], serializer: Serializer) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": [q.query_id for q in queries], "text": [serializer.serialize_query(q.text) for q in queries]},
        schema={"id": pl.Utf8, "text": pl.Utf8},
    )


def judgments_frame(judgments: list[Judgment]) -> pl.DataFrame:
    return pl.DataFrame(
        {"query_id": [j.query_id for j in judgments], "item_id": [j.item_id for j in judgments],
         "grade": [float(j.grade) for j in judgments]},
        schema={"query_id": pl.Utf8, "item_id": pl.Utf8, "grade": pl.Float64},
    )


def with_token_counts(texts: pl.DataFrame, counter: TokenCounter, max_tokens: int | None = None) -> pl.DataFrame:
    """Add `n_tokens`; documents longer than `max_tokens` are cut to it (they would never fit a row)."""
    method = counter.config.method
    if method == "whitespace":
        texts = texts.with_columns(pl.col("text").str.count_matches(r"\S+").cast(pl.Int64).alias("n_tokens"))
    elif method == "chars":
        n = (pl.col("text").str.len_chars() / counter.config.chars_per_token).round().cast(pl.Int64)
        texts = texts.with_columns(pl.when(pl.col("text") == "").then(0).otherwise(pl.max_horizontal(n, 1)).alias("n_tokens"))
    else:
        texts = texts.with_columns(pl.Series("n_tokens", counter.count_many(texts["text"].to_list()), dtype=pl.Int64))
    if max_tokens is not None:
        long = texts.filter(pl.col("n_tokens") > max_tokens)
        if long.height:
            cut = [counter.truncate(t, max_tokens) for t in long["text"].to_list()]
            fixed = long.with_columns(pl.Series("text", cut), pl.lit(max_tokens, dtype=pl.Int64).alias("n_tokens"))
            texts = pl.concat([texts.filter(pl.col("n_tokens") <= max_tokens), fixed])
    return texts


# ---------------------------------------------------------------- catalogue corpora (joint pre-training)


def _meta(**kw) -> str:
    return json.dumps(kw, ensure_ascii=False, sort_keys=True)


def _hash_split_of(ids: list[str], split: SplitConfig, entity: str) -> dict[str, str]:
    frame = with_hash_split(pl.DataFrame({"id": ids}, schema={"id": pl.Utf8}), "id", split, entity)
    return dict(zip(frame["id"].to_list(), frame["split"].to_list()))


def build_items(items: list[Item], serializer: Serializer, split: SplitConfig) -> Built:
    """One row per item (field dropout applies here: this is the augmentation corpus)."""
    splits = _hash_split_of([it.item_id for it in items], split, split.item_entity)
    rows = []
    for it in items:
        text = serializer.serialize(it)
        if text:
            rows.append(dict(row_id=f"item:{it.item_id}", source="items", documents=[text], doc_ids=[it.item_id],
                             text=text, split=splits[it.item_id], meta=_meta(kind="item")))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": _hash_leakage(frame, "doc_ids", "item_id", split, split.item_entity)})


def build_queries(queries: list[Query], serializer: Serializer, split: SplitConfig) -> Built:
    splits = _hash_split_of([q.query_id for q in queries], split, "query")
    rows = []
    for q in queries:
        text = serializer.serialize_query(q.text)
        rows.append(dict(row_id=f"query:{q.query_id}", source="queries", documents=[text], doc_ids=[q.query_id],
                         text=text, split=splits[q.query_id], meta=_meta(kind="query")))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": _hash_leakage(frame, "doc_ids", "query_id", split, "query")})


def positives_by_query(judgments: pl.DataFrame, min_grade: float) -> pl.DataFrame:
    """(query_id, item_ids best grade first) for judgments with grade >= min_grade."""
    return (
        judgments.filter(pl.col("grade") >= min_grade)
        .sort(["query_id", "grade", "item_id"], descending=[False, True, False])
        .group_by("query_id", maintain_order=True)
        .agg(pl.col("item_id").alias("item_ids"), pl.col("grade").alias("grades"))
    )


def build_query_item(queries: pl.DataFrame, judgments: pl.DataFrame, item_texts: pl.DataFrame,
                     cfg: QueryItemCorpus, split: SplitConfig, separator: str = "\n") -> Built:
    """A query followed by its positive items, best first (split unit: the query)."""
    texts = dict(zip(item_texts["id"].to_list(), item_texts["text"].to_list()))
    qtexts = dict(zip(queries["id"].to_list(), queries["text"].to_list()))
    groups = positives_by_query(judgments, cfg.min_grade)
    splits = _hash_split_of(groups["query_id"].to_list(), split, "query")
    rows, missing = [], 0
    for qid, item_ids, _ in groups.iter_rows():
        if qid not in qtexts:
            missing += 1
            continue
        kept = [i for i in item_ids if i in texts][: cfg.max_items]
        missing += len(item_ids) - len([i for i in item_ids if i in texts])
        if not kept:
            continue
        docs = [qtexts[qid]] + [texts[i] for i in kept]
        rows.append(dict(row_id=f"query_item:{qid}", source="query_item", documents=docs, doc_ids=[qid, *kept],
                         text=separator.join(docs), split=splits[qid], meta=_meta(kind="query_item", query_id=qid)))
    frame = corpus_from_rows(rows)
    leak = leakage_check(frame.filter(pl.col("split") == TRAIN)["doc_ids"].list.first(),
                         frame.filter(pl.col("split") == EVAL)["doc_ids"].list.first(), "query_id", "hash",
                         describe("query", split))
    return Built(frame, {"split": leak, "missing_texts": missing})


def build_field_targets(items: list[Item], serializer: Serializer, cfg: FieldTargetsCorpus, split: SplitConfig) -> Built:
    """LARR field -> field rows: documents = [source fields, target fields]; meta names both sides."""
    splits = _hash_split_of([it.item_id for it in items], split, split.item_entity)
    rows, skipped = [], 0
    for it in items:
        for task in cfg.tasks:
            source = serializer.serialize(it, only=task.source, dropout=False)
            target = serializer.serialize(it, only=task.target, dropout=False)
            if not source or not target:
                skipped += 1
                continue
            rows.append(dict(
                row_id=f"field:{task.name}:{it.item_id}", source="field_targets", documents=[source, target],
                doc_ids=[it.item_id, it.item_id], text=source + "\n" + target, split=splits[it.item_id],
                meta=_meta(kind="field_target", task=task.name, source_fields=task.source, target_fields=task.target),
            ))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": _hash_leakage(frame, "doc_ids", "item_id", split, split.item_entity),
                         "skipped_missing_fields": skipped})


# ---------------------------------------------------------------- in-context (CPRM)


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


def _chunks(frame: pl.DataFrame, key: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
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


def group_members(links: pl.DataFrame, key: str, member: str, max_group_size: int, chunk_rows: int) -> pl.DataFrame:
    """(split, group, member_id, rank): each group's distinct members, most engaged first (then by id).

    `links` carries a `split` column; a group is formed inside one split, so a train row never
    holds an eval member. Runs per chunk of whole groups (bounded memory).
    """
    out = []
    for part in _chunks(links, key, chunk_rows):
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


def _sequence_split(split: SplitConfig) -> str:
    """The split of user-sequence rows, in words, for the leakage report."""
    held = f"; held-out items ({describe(split.item_entity, split)}) never in a train row" if split.by == "hash" else ""
    return f"each user's last {split.holdout_last} event(s) held out{held}"


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
                         "event (user_id@position)", f"holdout_last={split.holdout_last}", _sequence_split(split))
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


# ---------------------------------------------------------------- reading comprehension (CPRM)


def build_reading(item_texts: pl.DataFrame, features: pl.DataFrame, cfg: ReadingCorpus, split: SplitConfig) -> Built:
    """Item text followed by its generated parts (summary, pseudo-queries, knowledge, tags) as separate documents."""
    feats = features
    if "entity_type" in feats.columns:
        feats = feats.filter(pl.col("entity_type").fill_null("item") == "item")
    feats = feats.unique("entity_id", keep="first", maintain_order=True)
    by_id = {row["entity_id"]: row for row in feats.iter_rows(named=True)}
    splits = _hash_split_of(item_texts["id"].to_list(), split, split.item_entity)
    labels = {"summary": "Summary", "pseudo_queries": "Searches", "knowledge": "Knowledge", "tags": "Tags"}
    rows, missing = [], 0
    for item_id, text in item_texts.iter_rows():
        feat = by_id.get(item_id) or {}
        docs, ids = [text], [item_id]
        for part in cfg.parts:
            value = feat.get(part)
            if isinstance(value, list):
                value = "; ".join(str(v) for v in value if v)
            if value:
                docs.append(f"{labels[part]}: {value}")
                ids.append(f"{item_id}#{part}")
        if len(docs) == 1:
            missing += 1
            continue
        rows.append(dict(row_id=f"reading:{item_id}", source="reading", documents=docs, doc_ids=ids,
                         text=cfg.separator.join(docs), split=splits[item_id],
                         meta=_meta(kind="reading", item_id=item_id, parts=[i.split("#", 1)[1] for i in ids[1:]])))
    frame = corpus_from_rows(rows)
    known = set(item_texts["id"].to_list())
    report = {
        "items_missing_features": missing,
        "features_without_item": sum(1 for k in by_id if k not in known),
        "split": leakage_check(
            frame.filter(pl.col("split") == TRAIN)["doc_ids"].list.first(),
            frame.filter(pl.col("split") == EVAL)["doc_ids"].list.first(), "item_id", "hash",
            describe(split.item_entity, split)),
    }
    return Built(frame, report)


# ---------------------------------------------------------------- pairs (align)


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
    report = {"split": _hash_leakage(frame, "anchor_id", "query_id", split, "query"),
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
    for part in _chunks(seq, "user_id", chunk_rows):
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
    return Built(frame, {"split": _hash_leakage(ids, "id", "item_id", split, split.item_entity)})


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
    leak = leakage_check(used, held, "event (user_id@position)", f"holdout_last={split.holdout_last}", _sequence_split(split))
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
        report["item_tag"] = _hash_leakage(frame, "anchor_id", "item_id", split, split.item_entity)
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
        report["user_tag"] = _hash_leakage(frame, "anchor_id", "user_id", split, "user")
        frames.append(frame)
    return Built(pl.concat(frames) if frames else empty_pairs(), report)


# ---------------------------------------------------------------- mix


def replay_corpus(docs: list[Query], split: SplitConfig) -> pl.DataFrame:
    """General-text replay documents (id, text) as one-document rows, so CPT keeps general language ability."""
    splits = _hash_split_of([d.query_id for d in docs], split, "doc")
    return corpus_from_rows([
        dict(row_id=f"replay:{d.query_id}", source="replay", documents=[d.text], doc_ids=[d.query_id], text=d.text,
             split=splits[d.query_id], meta=_meta(kind="replay"))
        for d in docs
    ])


def check_mix_weights(cfg: MixCorpus, available) -> None:
    """The recipe's mix weights name corpora this run builds, each with a weight > 0."""
    if not cfg.weights:
        raise RecforgeError("mix.weights: name at least one corpus with a weight, e.g. {in_context: 0.7, replay: 0.3}")
    for name, weight in cfg.weights.items():
        if name not in available:
            raise RecforgeError(f"mix.weights.{name}: no corpus named {name!r} was built in this run "
                                f"(built: {', '.join(sorted(available)) or 'none'})")
        if weight <= 0:
            raise RecforgeError(f"mix.weights.{name}: weights must be > 0, got {weight}")


def mix_plan(train_rows: dict[str, int], cfg: MixCorpus, seed: int) -> tuple[pl.DataFrame, dict]:
    """Which rows the mix takes, in its order: (`_mix_of`: the corpus' index in `cfg.weights`, `_pos`: the row's
    position among the corpus' train rows sorted by row id), one per mix row, and the ratios report.

    Only the corpora's train row counts enter: Polars' seeded `sample` picks positions from the height, the
    count and the seed alone, so sampling positions picks exactly the rows sampling the rows would."""
    check_mix_weights(cfg, train_rows)
    empty = [n for n in cfg.weights if train_rows[n] == 0]
    if empty:
        raise RecforgeError(f"mix.weights: corpus {empty[0]!r} has no train rows to mix")
    total_w = sum(cfg.weights.values())
    shares = {n: w / total_w for n, w in cfg.weights.items()}
    total = cfg.total_rows or int(min(train_rows[n] / s for n, s in shares.items()))
    parts, counts = [], {}
    for i, (name, share) in enumerate(shares.items()):
        want = max(1, round(share * total))
        height = train_rows[name]
        positions = pl.DataFrame({"_pos": pl.int_range(height, eager=True, dtype=pl.Int64)})
        sampled = positions.sample(n=want, with_replacement=want > height, shuffle=True, seed=seed + i)
        counts[name] = {"weight": cfg.weights[name], "share": round(share, 6), "rows": want,
                        "available": height, "repeated": want > height}
        parts.append(sampled.with_columns(pl.lit(i, dtype=pl.UInt32).alias("_mix_of")))
    plan = pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed).select("_mix_of", "_pos")
    n = plan.height
    for name in counts:
        counts[name]["actual_fraction"] = round(counts[name]["rows"] / n, 6)
    return plan, {"ratios": counts, "rows": n, "seed": seed}


def mix_row_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Mix rows in mix order -> their row ids `mix:<position>:<source row id>` (unique even where a small corpus
    was sampled with replacement), in the corpus columns."""
    ids = pl.format("mix:{}:{}", pl.int_range(pl.len()), pl.col("row_id")).alias("row_id")
    return as_corpus(frame.with_columns(ids))


def mix_corpora(corpora: dict[str, pl.DataFrame], cfg: MixCorpus, seed: int) -> Built:
    """Weighted interleaving of the train rows of several corpora.

    Row counts follow the normalised weights. Without `total_rows`, the total is the largest one no
    corpus has to repeat rows for; with it, a corpus too small for its share is sampled with
    replacement (reported as `repeated`). The interleaved order is a seeded shuffle (`mix_plan`; the same
    rows, a batch at a time, from corpus files: `recforge.data_recipes.build.write_mix`).
    """
    check_mix_weights(cfg, corpora)
    # sorted by row id: the sample is a function of the rows, not of their order (a merged sharded run == one run)
    train = {name: corpora[name].filter(pl.col("split") == TRAIN).sort("row_id", maintain_order=True)
             for name in cfg.weights}
    plan, report = mix_plan({n: f.height for n, f in train.items()}, cfg, seed)
    offsets, start = [], 0
    for frame in train.values():
        offsets.append(start)
        start += frame.height
    pool = pl.concat([as_corpus(f) for f in train.values()])
    where = plan.select(pl.col("_mix_of").replace_strict(list(range(len(offsets))), offsets, return_dtype=pl.Int64)
                        + pl.col("_pos"))
    mixed = pool[where.to_series()]
    return Built(mix_row_ids(mixed), report)
