"""Issue 25: validation queries carved from the training queries, LLM pseudo-queries -> round-trip filter -> extra
training pairs (weighted, masked) for `recforge align`, and the pseudo-query prompt's k."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pytest

from recforge.align.align_config import DataConfig, EsciSource, ExtraPairs, PseudoFilterConfig
from recforge.align.pairs import build_esci, load_align_data, pairs_table, read_pairs
from recforge.io import write_parquet_atomic
from recforge.records import features_schema
from recforge.splits import is_eval


def test_validation_queries_come_from_training_queries_only():
    held = build_esci(EsciSource())
    val = build_esci(EsciSource(eval_on="validation"))
    train_q = {p["anchor_id"].split(":", 1)[1] for p in val.train_pairs}
    val_q = set(val.task.queries)
    assert val_q and train_q and not train_q & val_q
    assert not val_q & set(held.task.queries)  # never a held-out query
    assert all(not is_eval("query", q) for q in val_q | train_q)
    # the validation queries are training queries of the default run; together they are exactly its training queries
    assert val_q | train_q == {p["anchor_id"].split(":", 1)[1] for p in held.train_pairs}
    assert val.notes["validation"]["overlap_with_heldout"] == 0 and val.task.name == "esci_validation"
    # deterministic, and the share follows validation_fraction
    assert build_esci(EsciSource(eval_on="validation")).task.queries == val.task.queries
    assert len(build_esci(EsciSource(eval_on="validation", validation_fraction=0.5)).task.queries) > len(val_q)


def _pseudo_pairs(tmp_path, n=6, weight=1.0):
    data = build_esci(EsciSource())
    pids = sorted(data.task.corpus)[:n]
    rows = [{"pair_id": f"pq:{p}:0", "kind": "query_item", "anchor_id": f"pseudo_query:{p}:0", "anchor": f"query for {p}",
             "positive_id": p, "positive": data.task.corpus[p], "weight": weight, "negative_id": None, "negative": None,
             "anchor_positive_ids": [p], "split": "train"} for p in pids]
    rows.append(dict(rows[0], pair_id="pq:unknown:0", positive_id="NOT_IN_CATALOGUE", anchor_positive_ids=["NOT_IN_CATALOGUE"]))
    write_parquet_atomic(pairs_table(rows), tmp_path / "pairs.parquet")
    return data, rows


def test_extra_pairs_join_the_real_pairs_weighted(tmp_path):
    data, rows = _pseudo_pairs(tmp_path, weight=1.0)
    cfg = DataConfig(extra_pairs=[ExtraPairs(path=str(tmp_path / "pairs.parquet"), weight=0.5)])
    loaded = load_align_data(cfg)
    real = loaded.train_pairs[: len(data.train_pairs)]
    extra = loaded.train_pairs[len(data.train_pairs):]
    assert real == data.train_pairs  # real pairs untouched
    assert len(extra) == len(rows) - 1  # the item outside the catalogue is dropped
    assert all(p["weight"] == 0.5 and p["pair_id"].startswith("extra0:") for p in extra)
    assert all(p["anchor_positive_ids"] == [p["positive_id"]] for p in extra)
    assert loaded.task.queries == data.task.queries  # held-out task unchanged
    assert loaded.notes["extra_pairs"][str(tmp_path / "pairs.parquet")]["rows"] == len(extra)


def test_extra_pairs_are_masked_and_weighted_in_the_loss(tmp_path):
    from recforge.align.losses import PairIdTable

    data, rows = _pseudo_pairs(tmp_path)
    loaded = load_align_data(DataConfig(extra_pairs=[ExtraPairs(path=str(tmp_path / "pairs.parquet"), weight=0.25)]))
    table = PairIdTable(loaded.train_pairs, use_weights=True)
    n_real = len(data.train_pairs)
    assert table.weight[:n_real] == [1.0] * n_real and set(table.weight[n_real:]) == {0.25}
    # a real query whose positive is a pseudo pair's item: that item is masked as its false negative
    pid = loaded.train_pairs[n_real]["positive_id"]
    real_rows = [i for i, p in enumerate(loaded.train_pairs[:n_real]) if pid in p["anchor_positive_ids"]]
    for i in real_rows:
        assert table.items[n_real][0] in table.known[i]


def _features(tmp_path, queries: dict[str, list[str]]):
    rows = [{"entity_type": "item", "entity_id": pid, "tags": [], "summary": None, "pseudo_queries": qs, "knowledge": None}
            for pid, qs in queries.items()]
    path = tmp_path / "features.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=features_schema()), path)
    return path


def _catalogue(tmp_path, products: dict[str, str]):
    path = tmp_path / "products.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for pid, title in products.items():
            f.write(json.dumps({"product_id": pid, "product_title": title}) + "\n")
    return path


def test_pseudo_filter_keeps_round_trip_consistent_queries(tmp_path, minilm_dir):
    from recforge.align.pseudo_filter import run_pseudo_filter

    products = {"A": "Nike Air Zoom Pegasus running shoes for men", "B": "Stainless steel chef knife 8 inch",
                "C": "USB C charging cable braided 2m", "D": "Organic green tea bags, 100 count"}
    generated = {"A": ["nike running shoes", "chef knife steel"], "B": ["kitchen knife 8 inch"],
                 "C": ["usb c cable", "green tea"], "Z": ["not in the catalogue"],
                 "D": ["Organic green tea bags, 100 count", "a b c d e f g h i j"]}  # the title given back; too long
    cfg = PseudoFilterConfig(out_dir=str(tmp_path / "out"), generated=str(_features(tmp_path, generated)),
                             catalogue={"path": str(_catalogue(tmp_path, products)), "id": "product_id",
                                        "text_fields": ["product_title"]},
                             model=str(minilm_dir), top_k=1, weight=0.5, device="cpu")
    report = run_pseudo_filter(cfg)
    kept = read_pairs(str(tmp_path / "out" / "pairs.parquet"))
    assert {(p["anchor"], p["positive_id"]) for p in kept} == {("nike running shoes", "A"), ("kitchen knife 8 inch", "B"),
                                                               ("usb c cable", "C")}
    assert report["generated_queries"] == 8 and report["scored_queries"] == 5 and report["kept_pairs"] == 3
    assert report["dropped_before_scoring"] == {"item_not_in_catalogue": 1, "too_short": 0, "too_long": 1, "title_copy": 1,
                                                "over_max_per_item": 0}
    assert all(p["weight"] == 0.5 and p["anchor_positive_ids"] == [p["positive_id"]] and p["split"] == "train" for p in kept)
    assert json.loads((tmp_path / "out" / "filter_report.json").read_text())["kept_pairs"] == 3
    # filter none keeps every scored query
    cfg2 = cfg.model_copy(update={"filter": "none", "out_dir": str(tmp_path / "all")})
    assert run_pseudo_filter(cfg2)["kept_pairs"] == 5


def test_pseudo_query_prompt_k_sets_the_list_length():
    from recforge.prompts.templates import load_prompt

    t = load_prompt("pseudo_queries")
    assert "5 different search queries" in t.render_user({"title": "Dune"}, "x", {"k": 5})
    schema = t.output_for({"k": 5}).json_schema["properties"]["queries"]
    assert schema["maxItems"] == 5 and schema["minItems"] == 3
    two = t.output_for({"k": 2}).json_schema["properties"]["queries"]
    assert two["maxItems"] == two["minItems"] == 2


@pytest.mark.slow
def test_pseudo_query_chain_end_to_end(tmp_path, tiny_model_dir, minilm_dir):
    """generate (tiny LM, transformers engine) -> pseudo-filter (MiniLM) -> align with the kept pairs."""
    import subprocess
    import sys

    def rf(*args):
        r = subprocess.run([sys.executable, "-m", "recforge", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    gen = tmp_path / "gen"
    rf("generate", "generate/recipes/esci_pseudo_queries.yaml", f"model.name_or_path={tiny_model_dir}", "input.limit=8",
       "engine.kind=transformers", "engine.cpu_threads=1", "max_failure_rate=1.0", f"out_dir={gen}", "--overwrite")
    out = rf("pseudo-filter", "align/recipes/esci_pseudo_filter.yaml", f"generated={gen}", "filter=none",
             f"out_dir={tmp_path / 'filter'}")
    assert "kept" in out
    rf("align", "align/recipes/esci_minilm_pseudo.yaml", f"data.extra_pairs=[{{path: {tmp_path / 'filter' / 'pairs.parquet'}}}]",
       "train.max_steps=2", "eval.compare_base=false", f"out_dir={tmp_path / 'align'}")
    report = json.loads((tmp_path / "align" / "eval" / "retrieval_metrics.json").read_text())
    assert "extra_pairs" in report["data_notes"]
