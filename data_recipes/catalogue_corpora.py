"""Corpora of one row per catalogue entry: items, queries, query -> positive items, field -> field targets (LARR),
reading comprehension (item text + generated knowledge), and general-text replay documents.

CPRM joint pre-training and CPT replay read these. Catalogue-sized work (serialising each item once) is a plain
loop; each row is split by the hash of its entity's id (item, query or document).
"""

from __future__ import annotations

import polars as pl

from recforge.data_recipes.corpus_frames import Built, corpus_from_rows, hash_leakage, hash_splits, row_meta
from recforge.data_recipes.recipe_config import FieldTargetsCorpus, QueryItemCorpus, ReadingCorpus
from recforge.data_recipes.serialize import Serializer
from recforge.data_recipes.splits import EVAL, TRAIN, SplitConfig, leakage_check
from recforge.records import Item, Query
from recforge.splits import describe


def build_items(items: list[Item], serializer: Serializer, split: SplitConfig) -> Built:
    """One row per item (field dropout applies here: this is the augmentation corpus)."""
    splits = hash_splits([it.item_id for it in items], split, split.item_entity)
    rows = []
    for it in items:
        text = serializer.serialize(it)
        if text:
            rows.append(dict(row_id=f"item:{it.item_id}", source="items", documents=[text], doc_ids=[it.item_id],
                             text=text, split=splits[it.item_id], meta=row_meta(kind="item")))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": hash_leakage(frame, "doc_ids", "item_id", split, split.item_entity)})


def build_queries(queries: list[Query], serializer: Serializer, split: SplitConfig) -> Built:
    splits = hash_splits([q.query_id for q in queries], split, "query")
    rows = []
    for q in queries:
        text = serializer.serialize_query(q.text)
        rows.append(dict(row_id=f"query:{q.query_id}", source="queries", documents=[text], doc_ids=[q.query_id],
                         text=text, split=splits[q.query_id], meta=row_meta(kind="query")))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": hash_leakage(frame, "doc_ids", "query_id", split, "query")})


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
    splits = hash_splits(groups["query_id"].to_list(), split, "query")
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
                         text=separator.join(docs), split=splits[qid], meta=row_meta(kind="query_item", query_id=qid)))
    frame = corpus_from_rows(rows)
    leak = leakage_check(frame.filter(pl.col("split") == TRAIN)["doc_ids"].list.first(),
                         frame.filter(pl.col("split") == EVAL)["doc_ids"].list.first(), "query_id", "hash",
                         describe("query", split))
    return Built(frame, {"split": leak, "missing_texts": missing})


def build_field_targets(items: list[Item], serializer: Serializer, cfg: FieldTargetsCorpus, split: SplitConfig) -> Built:
    """LARR field -> field rows: documents = [source fields, target fields]; meta names both sides."""
    splits = hash_splits([it.item_id for it in items], split, split.item_entity)
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
                meta=row_meta(kind="field_target", task=task.name, source_fields=task.source, target_fields=task.target),
            ))
    frame = corpus_from_rows(rows)
    return Built(frame, {"split": hash_leakage(frame, "doc_ids", "item_id", split, split.item_entity),
                         "skipped_missing_fields": skipped})



def build_reading(item_texts: pl.DataFrame, features: pl.DataFrame, cfg: ReadingCorpus, split: SplitConfig) -> Built:
    """Item text followed by its generated parts (summary, pseudo-queries, knowledge, tags) as separate documents."""
    feats = features
    if "entity_type" in feats.columns:
        feats = feats.filter(pl.col("entity_type").fill_null("item") == "item")
    feats = feats.unique("entity_id", keep="first", maintain_order=True)
    by_id = {row["entity_id"]: row for row in feats.iter_rows(named=True)}
    splits = hash_splits(item_texts["id"].to_list(), split, split.item_entity)
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
                         meta=row_meta(kind="reading", item_id=item_id, parts=[i.split("#", 1)[1] for i in ids[1:]])))
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



def replay_corpus(docs: list[Query], split: SplitConfig) -> pl.DataFrame:
    """General-text replay documents (id, text) as one-document rows, so CPT keeps general language ability."""
    splits = hash_splits([d.query_id for d in docs], split, "doc")
    return corpus_from_rows([
        dict(row_id=f"replay:{d.query_id}", source="replay", documents=[d.text], doc_ids=[d.query_id], text=d.text,
             split=splits[d.query_id], meta=row_meta(kind="replay"))
        for d in docs
    ])
