"""Align inputs: ESCI split by query, pairs Parquet from data_recipes, retrieval metrics and reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recforge.align.align_config import DataConfig, EsciSource
from recforge.align.evaluate import rank_metrics, write_report
from recforge.align.pairs import build_esci, build_from_pairs, load_align_data, pairs_table
from recforge.config import RecforgeError
from recforge.io import write_parquet_atomic
from recforge.splits import SplitRule


def test_esci_split_never_shares_a_query_and_is_deterministic():
    data = build_esci(EsciSource())
    train_queries = {p["anchor_id"].split(":", 1)[1] for p in data.train_pairs}
    assert train_queries and data.task.queries
    assert not train_queries & set(data.task.queries)
    assert build_esci(EsciSource()).train_pairs == data.train_pairs
    for p in data.train_pairs:
        assert p["positive_id"] in p["anchor_positive_ids"]
        assert p["negative_id"] is None or p["negative_id"] not in p["anchor_positive_ids"]
    # every held-out query has at least one exact/substitute product in the catalogue
    assert all(any(g >= 2 for g in data.task.qrels[q].values()) for q in data.task.queries)
    assert all(d in data.task.corpus for q in data.task.qrels for d in data.task.qrels[q])
    more = build_esci(EsciSource(), SplitRule(eval_percent={"query": 60}))
    assert len(more.task.queries) > len(data.task.queries)


def test_pseudo_queries_come_from_catalogue_titles_only():
    plain = build_esci(EsciSource())
    data = build_esci(EsciSource(pseudo_queries_per_product=2, pseudo_query_words=(1, 3)))
    pseudo = [p for p in data.train_pairs if p["pair_id"].startswith("ict:")]
    assert data.train_pairs[: len(plain.train_pairs)] == plain.train_pairs  # real pairs untouched
    assert (data.task.queries, data.task.qrels) == (plain.task.queries, plain.task.qrels)  # the held-out split too
    assert len(pseudo) == 2 * sum(len(t.split()) >= 2 for t in data.task.corpus.values())
    for p in pseudo:
        head = [w.lower() for w in data.task.corpus[p["positive_id"]].split()[:12]]
        words = p["anchor"].split()
        assert 1 <= len(words) <= 3 and " ".join(words) in " ".join(head)
        assert p["anchor_positive_ids"] == [p["positive_id"]] and p["negative_id"] is None
    assert data.notes["pseudo_query_pairs"] == len(pseudo) and data.notes["train_query_pairs"] == len(plain.train_pairs)
    assert build_esci(EsciSource(pseudo_queries_per_product=2, pseudo_query_words=(1, 3))).train_pairs == data.train_pairs


def test_pairs_parquet_from_data_recipes_is_read(tmp_path):
    data = build_esci(EsciSource())
    held = [dict(p, split="eval", pair_id=p["pair_id"] + ":e", anchor_id="query:held" + str(i))
            for i, p in enumerate(data.train_pairs[:20])]
    write_parquet_atomic(pairs_table(data.train_pairs + held), tmp_path / "pairs" / "pairs-00000-of-00001.parquet")
    loaded = load_align_data(DataConfig(source="pairs", pairs_path=str(tmp_path / "pairs")))
    assert len(loaded.train_pairs) == len(data.train_pairs)
    assert len(loaded.task.queries) == 20
    assert loaded.notes["eval_anchors_also_in_train"] == 0
    q = next(iter(loaded.task.qrels))
    assert set(loaded.task.qrels[q]) <= set(loaded.task.corpus)


def test_multi_kind_pairs_are_also_scored_per_kind_and_can_be_filtered(tmp_path, minilm_dir):
    """user -> tag queries are ranked among all texts (shared space) and among the tags only (`user_tag:*`)."""
    from sentence_transformers import SentenceTransformer

    from recforge.align.evaluate import evaluate_model

    tags = ["science-fiction", "romance", "history", "poetry", "fantasy", "mystery"]
    books = {f"b{i}": t for i, t in enumerate(["Dune", "Pride and Prejudice", "SPQR", "Leaves of Grass",
                                                 "The Hobbit", "Gone Girl"])}
    rows = []
    for n, (bid, title) in enumerate(books.items()):
        for split in ("train", "eval"):
            rows.append({"pair_id": f"ut{n}{split}", "kind": "user_tag", "anchor_id": f"u{n}{split}",
                         "anchor": f"History: {title}", "positive_id": tags[n], "positive": tags[n], "split": split,
                         "anchor_positive_ids": [tags[n]], "weight": 1.0})
            rows.append({"pair_id": f"ui{n}{split}", "kind": "user_item", "anchor_id": f"u{n}{split}",
                         "anchor": f"Likes {tags[n]}", "positive_id": bid, "positive": title, "split": split,
                         "anchor_positive_ids": [bid, "b0"], "weight": 1.0})  # b0: already in the history
    write_parquet_atomic(pairs_table(rows), tmp_path / "pairs.parquet")
    data = load_align_data(DataConfig(source="pairs", pairs_path=str(tmp_path / "pairs.parquet")))
    assert data.task.kind_corpus["user_tag"] == set(tags) and data.task.kind_corpus["user_item"] == set(books)
    assert set(data.task.query_kind.values()) == {"user_tag", "user_item"}
    assert data.task.qrels["user_item:u3eval"] == {"b3": 1.0}  # the held-out item only, not the history
    metrics = evaluate_model(SentenceTransformer(str(minilm_dir), device="cpu"), data.task, [1, 10])
    assert metrics["queries"] == 12
    # Each kind ranks only its own 6 candidates (of 12 texts), so its top 10 always holds the relevant one.
    assert metrics["user_tag:recall@10"] == 1.0 and metrics["user_item:recall@10"] == 1.0  # 6 candidates each
    # NDCG@10 by hand: one relevant tag per user -> 1 / log2(1 + its rank among the 6 tags), averaged
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    users = [q for q, k in data.task.query_kind.items() if k == "user_tag"]
    q_vecs = model.encode([data.task.queries[q] for q in users], normalize_embeddings=True)
    t_vecs = model.encode(tags, normalize_embeddings=True)
    scores = q_vecs @ t_vecs.T
    ranks = [1 + int((row > row[tags.index(next(iter(data.task.qrels[q])))]).sum()) for q, row in zip(users, scores)]
    assert metrics["user_tag:ndcg@10"] == pytest.approx(float(np.mean([1 / math.log2(1 + r) for r in ranks])), abs=1e-4)
    assert min(ranks) == 1 and max(ranks) > 1  # a real ranking: some users' tag is first, some is not

    only = load_align_data(DataConfig(source="pairs", pairs_path=str(tmp_path / "pairs.parquet"), kinds=["user_tag"]))
    assert {p["kind"] for p in only.train_pairs} == {"user_tag"} and len(only.task.queries) == 6
    assert only.task.query_kind == {}  # one kind: nothing extra to report
    with pytest.raises(RecforgeError, match=r"pairs.parquet: data.kinds=\['item_item'\]"):
        load_align_data(DataConfig(source="pairs", pairs_path=str(tmp_path / "pairs.parquet"), kinds=["item_item"]))


def test_pairs_errors_name_the_file(tmp_path):
    with pytest.raises(RecforgeError, match="not found"):
        build_from_pairs(str(tmp_path / "missing.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"anchor": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(RecforgeError, match=r"bad.parquet.*missing columns"):
        build_from_pairs(str(tmp_path / "bad.parquet"))


def test_rank_metrics_by_hand_and_against_sklearn():
    from sklearn.metrics import ndcg_score

    ranked = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    qrels = [{"b": 3.0, "d": 2.0}, {"w": 2.0, "q": 3.0}]  # q is relevant but never retrieved
    m = rank_metrics(ranked, qrels, [1, 2, 4], relevant_min_grade=2)
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@4"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    # query 1 NDCG by sklearn with exponential gains: scores = rank order, gains 2^g - 1
    docs = ["a", "b", "c", "d"]
    gains = np.array([[2 ** qrels[0].get(d, 0) - 1 for d in docs]])
    ndcg1 = ndcg_score(gains, np.array([[4, 3, 2, 1]]), k=10)
    dcg2 = (2**2 - 1) / math.log2(5)
    idcg2 = (2**3 - 1) / math.log2(2) + (2**2 - 1) / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((ndcg1 + dcg2 / idcg2) / 2)


def test_report_has_json_markdown_and_png(tmp_path):
    res = {"base": {"recall@10": 0.5, "ndcg@10": 0.4, "queries": 3}, "tuned": {"recall@10": 0.7, "ndcg@10": 0.6, "queries": 3}}
    out = write_report(res, tmp_path, "demo")
    assert json.loads((tmp_path / "retrieval_metrics.json").read_text())["results"] == res
    md = (tmp_path / "retrieval_metrics.md").read_text()
    assert "| ndcg@10 | 0.4000 | 0.6000 | +0.2000 |" in md
    png = (tmp_path / "retrieval_metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["table"] in md
