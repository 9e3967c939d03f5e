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
    more = build_esci(EsciSource(eval_percent=60))
    assert len(more.task.queries) > len(data.task.queries)


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
