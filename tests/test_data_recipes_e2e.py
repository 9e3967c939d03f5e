"""`recforge data` end to end: the shipped recipes on the shipped samples -> Parquet `datasets` loads,
plus the manifest (special tokens, row counts, leakage report, rejects by reason)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from recforge.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "data_recipes" / "recipes"


def load_split(out: Path, corpus: str, split: str):
    from datasets import load_dataset

    files = sorted(str(p) for p in (out / corpus).glob(f"{split}-*.parquet"))
    return load_dataset("parquet", data_files={split: files}, split=split)


def test_esci_recipe_builds_search_corpora_loadable_by_datasets(tmp_path, capsys):
    out = tmp_path / "esci"
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "resolved_config.yaml").is_file()
    assert manifest["special_tokens"] == ["<|endofpiece|>", "<|startofpiece|>"]
    assert set(manifest["corpora"]) == {"items", "queries", "query_item", "in_context", "pairs", "replay"}
    # the general-text replay corpus keeps both sides of the project's `doc` split: CPT replays its train rows
    # and tracks general-text perplexity on the held-out ones
    from recforge.splits import split_of

    replay = manifest["corpora"]["replay"]["rows"]
    ids = [json.loads(line)["doc_id"] for line in
           (REPO / "data_recipes/samples/general_text_replay/general_text.jsonl").read_text().splitlines()]
    assert replay == {"train": sum(split_of("doc", i) == "train" for i in ids),
                      "eval": sum(split_of("doc", i) == "eval" for i in ids)}
    assert replay["eval"] > 0
    assert manifest["skipped"]["reading"] == "no inputs.features"
    assert manifest["splits"]["leakage_ok"] is True
    assert manifest["rejects"]["total"] == 0
    assert {i["name"]: i["rows"] for i in manifest["inputs"]} == {"items": 431, "queries": 350, "judgments": 790, "replay": 50}

    items = load_split(out, "items", "train")
    assert items.num_rows == manifest["corpora"]["items"]["rows"]["train"]
    assert items.num_rows + manifest["corpora"]["items"]["rows"]["eval"] == 431
    assert items[0]["text"].startswith("<|startofpiece|>Title: ") and items[0]["text"].endswith("<|endofpiece|>")

    in_context = load_split(out, "in_context", "train")
    assert in_context.num_rows == manifest["corpora"]["in_context"]["rows"]["train"] > 0
    row = in_context[0]
    assert len(row["documents"]) == len(row["doc_ids"]) >= 2
    assert json.loads(row["meta"])["relation"] in ("items_by_query", "queries_by_item")

    pairs = pl.read_parquet(out / "pairs" / "*.parquet")
    assert set(pairs["kind"]) == {"query_item"}
    # every positive is a known positive of its anchor; no hard negative is
    assert all(p in ids for p, ids in zip(pairs["positive_id"], pairs["anchor_positive_ids"]))
    negs = pairs.filter(pl.col("negative_id").is_not_null())
    assert negs.height > 0 and not any(n in ids for n, ids in zip(negs["negative_id"], negs["anchor_positive_ids"]))
    # query-level split: no eval query has a train pair
    train_q = set(pairs.filter(pl.col("split") == "train")["anchor_id"])
    assert not train_q & set(pairs.filter(pl.col("split") == "eval")["anchor_id"])
    assert "leakage check: ok" in capsys.readouterr().out


def test_goodbooks_recipe_builds_in_context_pairs_and_mix(tmp_path):
    out = tmp_path / "gb"
    # a smaller mix and user-pair cap keep the test quick; everything else is the shipped recipe
    assert main(["data", str(RECIPES / "goodbooks.yaml"), f"out_dir={out}", "mix.total_rows=2000",
                 "pairs.user_item.max_pairs_per_user=3"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["special_tokens"] == ["<|authors|>", "<|endofpiece|>", "<|language|>", "<|title|>", "<|year|>"]
    assert m["splits"]["leakage_ok"] is True
    assert m["splits"]["leakage"]["pairs/user_item"]["eval_ids"] > 1000
    relations = m["corpora"]["in_context"]["report"]["relations"]
    assert relations["user_sequence"]["rows"]["train"] > 1000 and relations["co_engaged_items"]["rows"]["train"] > 100

    pairs = pl.read_parquet(out / "pairs" / "*.parquet")
    assert set(pairs["kind"]) == {"item_item", "user_item", "item_tag", "user_tag"}
    ii = pairs.filter(pl.col("kind") == "item_item")
    assert ii["weight"].min() >= 0.01 and ii["weight"].max() <= 30
    assert ii.group_by("anchor_id").len()["len"].max() <= 10
    assert not pairs.filter(pl.col("kind") == "item_tag")["positive"].is_in(["to-read", "favorites"]).any()

    mix = load_split(out, "mix", "train")
    assert mix.num_rows == 2000
    ratios = m["corpora"]["mix"]["report"]["ratios"]
    assert {k: v["rows"] for k, v in ratios.items()} == {"in_context": 1400, "field_targets": 300, "items": 200, "replay": 100}
    assert sum(s == "replay" for s in mix["source"]) == 100 and ratios["replay"]["actual_fraction"] == 0.05

    field = load_split(out, "field_targets", "train")
    meta = json.loads(field[0]["meta"])
    assert meta["source_fields"] and meta["target_fields"] and len(field[0]["documents"]) == 2


def test_reading_corpus_joins_a_features_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recforge.records import features_schema

    feats = tmp_path / "features.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"entity_type": "item", "entity_id": "136802131X", "tags": [], "summary": "A phone case.",
         "pseudo_queries": ["iphone case"], "knowledge": None},
    ], schema=features_schema()), feats)
    out = tmp_path / "esci"
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={out}", "pairs.enabled=false"]) == 0
    assert list((out / "in_context").glob("train-*.parquet"))
    # a re-run into the same folder replaces its corpora: one it no longer builds leaves no stale shards
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={out}", f"inputs.features.path={feats}",
                 "in_context.enabled=false", "pairs.enabled=false"]) == 0
    assert not list((out / "in_context").glob("*.parquet"))
    m = json.loads((out / "manifest.json").read_text())
    reading = m["corpora"]["reading"]
    assert sum(reading["rows"].values()) == 1
    assert reading["report"]["items_missing_features"] == 430 and reading["report"]["features_without_item"] == 0
    row = pl.read_parquet(out / "reading" / "*.parquet").row(0, named=True)
    assert row["doc_ids"] == ["136802131X", "136802131X#summary", "136802131X#pseudo_queries"]
    assert row["documents"][1:] == ["Summary: A phone case.", "Searches: iphone case"]


def test_malformed_rows_go_to_rejects_and_strict_stops(tmp_path, capsys):
    items = tmp_path / "items.jsonl.gz"
    lines = [
        b'{"sku": "1", "name": "good one"}',
        b'{"sku": "2", "name": ',                 # invalid JSON
        b'{"name": "no id"}',                      # missing id
        b'{"sku": "3", "name": "bad \xff utf8"}',  # bad UTF-8
        b'{"sku": "4", "name": ""}',               # empty text
        b'{"sku": "1", "name": "conflicting"}',    # duplicate id, different content
        b'{"sku": "5", "name": "good two"}',
    ]
    with gzip.open(items, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs:\n  items: {{path: {items}, id: sku, fields: {{title: name}}}}\n"
        "split: {eval_percent: {item: 0}}\nin_context: {enabled: false}\npairs: {enabled: false}\n"
    )
    out = tmp_path / "out"
    assert main(["data", str(recipe), f"out_dir={out}"]) == 0
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "invalid_json"), (3, "missing_id"), (4, "bad_utf8"), (5, "empty_text"), (6, "conflicting_duplicate")]
    m = json.loads((out / "manifest.json").read_text())
    assert m["rejects"]["total"] == 5 and m["rejects"]["by_reason"]["invalid_json"] == 1
    assert sorted(pl.read_parquet(out / "items" / "*.parquet")["doc_ids"].list.first()) == ["1", "5"]

    capsys.readouterr()
    assert main(["data", str(recipe), f"out_dir={tmp_path / 'strict'}", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "items.jsonl.gz:2: invalid_json" in err and "Traceback" not in err


def test_recipe_errors_name_the_key(tmp_path, capsys):
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={tmp_path}", "in_context.max_tokenz=3"]) == 2
    assert "in_context.max_tokenz" in capsys.readouterr().err
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={tmp_path}",
                 "inputs.items.path=/nonexistent/items.jsonl"]) == 2
    assert "/nonexistent/items.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["chars"])
def test_token_count_method_is_configurable(tmp_path, method):
    out = tmp_path / "esci"
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={out}", f"token_count.method={method}",
                 "in_context.max_tokens=40", "pairs.enabled=false"]) == 0
    rows = pl.read_parquet(out / "in_context" / "*.parquet")
    n_tokens = [json.loads(m)["n_tokens"] for m in rows["meta"]]
    assert max(n_tokens) <= 40
    # chars: ~4 chars per token, so a 40-token row stays near 160 characters of documents
    assert max(sum(len(d) for d in docs) for docs in rows["documents"]) <= 40 * 4 + 2 * 8


def test_a_catalogue_sharing_no_id_with_the_judgments_still_builds(tmp_path, capsys):
    """Every judgment names an unknown item: the query-item corpora are empty, not a polars traceback."""
    items = tmp_path / "items.jsonl"
    items.write_text('{"product_id": "X1", "product_title": "a lamp"}\n{"product_id": "X2", "product_title": "a cable"}\n')
    out = tmp_path / "out"
    assert main(["data", str(RECIPES / "esci_search.yaml"), f"out_dir={out}", f"inputs.items.path={items}"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["corpora"]["query_item"]["rows"] == {"train": 0, "eval": 0}
    assert m["corpora"]["pairs"]["rows"] == {"train": 0, "eval": 0}
    assert m["splits"]["leakage_ok"] is True and "Traceback" not in capsys.readouterr().err
