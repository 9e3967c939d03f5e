"""One evaluation split across the chained stages, on the shipped ESCI and goodbooks samples.

data -> CPT corpus -> SFT data -> align pairs -> tags eval: no id a later stage evaluates on is in the
training rows of an earlier stage, the stages hold out the very same queries and books, and every
leakage report names the split it used. Data is built, no model is trained (fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recforge.cli import main
from recforge.config import load_recipe

REPO = Path(__file__).resolve().parents[1]

# entity type of the ids in each data corpus / pair column; `item` in ESCI, `book` in goodbooks
RELATION_ENTITY = {"items_by_query": "item", "queries_by_item": "query", "user_sequence": "item", "co_engaged_items": "item"}
PAIR_ENTITY = {  # kind -> (anchor unit, positive / negative entity)
    "query_item": ("query", "item"), "item_item": ("item", "item"), "user_item": (None, "item"),
    "item_tag": ("item", "tag"), "user_tag": ("user_tag", "tag"),
}
# Units: an entity split by the hash rule is `<entity>:<id>`; a user's held-out next item (leave-last-out) is the
# event `user_item:<user>><item>`; a user's interest tags (users split by hash) `user_tag:<user>`. A user's
# history text is input, not what any stage evaluates on, so the bare user id is not a unit.


def typed(entity: str, ids, item_entity: str) -> set[str]:
    entity = item_entity if entity == "item" else entity
    return {f"{entity}:{i}" for i in ids if i is not None}


def events(user: str, items) -> set[str]:
    return {f"user_item:{user}>{i}" for i in items if i is not None}


def corpus_ids(rows: list[dict], corpus: str, item_entity: str) -> set[str]:
    """Typed ids of corpus rows (`doc_ids`), by what each corpus' documents are."""
    out: set[str] = set()
    for r in rows:
        docs = list(r["doc_ids"])
        source = r.get("source", corpus)
        if source == "queries":
            out |= typed("query", docs, item_entity)
        elif source == "query_item":
            out |= typed("query", docs[:1], item_entity) | typed("item", docs[1:], item_entity)
        elif source == "in_context":
            meta = json.loads(r["meta"])
            out |= typed(RELATION_ENTITY[meta["relation"]], docs, item_entity)
            if meta["relation"] == "user_sequence":
                out |= events(meta["group"], docs)
        elif source == "replay":
            out |= typed("doc", docs, item_entity)
        else:  # items, field_targets, reading: the item's own documents
            out |= typed("item", [d.split("#")[0] for d in docs], item_entity)
    return out


def pair_ids(rows: list[dict], item_entity: str) -> set[str]:
    out: set[str] = set()
    for r in rows:
        anchor, other = PAIR_ENTITY[r["kind"]]
        if anchor is None:
            out |= events(r["anchor_id"], [r["positive_id"]])
        else:
            out |= typed(anchor, [r["anchor_id"]], item_entity)
        if other != "tag":
            out |= typed(other, [r["positive_id"], r.get("negative_id"), *(r.get("anchor_positive_ids") or [])], item_entity)
    return out


def data_stage(out: Path, item_entity: str) -> tuple[set[str], set[str], dict]:
    """(train ids, eval ids, manifest) of a `recforge data` run, over every corpus and pair written."""
    manifest = json.loads((out / "manifest.json").read_text())
    ids = {"train": set(), "eval": set()}
    for corpus in manifest["corpora"]:
        for split in ids:
            files = sorted((out / corpus).glob(f"{split}-*.parquet"))
            rows = pl.read_parquet(files).to_dicts() if files else []
            ids[split] |= pair_ids(rows, item_entity) if corpus == "pairs" else corpus_ids(rows, corpus, item_entity)
    return ids["train"], ids["eval"], manifest


def cpt_stage(esci: Path, goodbooks: Path, demo: dict[str, Path]) -> set[str]:
    """Typed ids of the rows finetune's CPT reader takes for training (`split: train`) from every CPT corpus."""
    from recforge.finetune.corpus import read_corpus

    train: set[str] = set()
    for out, item_entity in ((esci, "item"), (goodbooks, "book")):
        for corpus in ("items", "queries", "query_item", "field_targets", "in_context", "mix"):
            if not (out / corpus).is_dir():
                continue
            picked = {r["row_id"] for r in read_corpus(str(out / corpus), "train")}
            rows = [r for r in pl.read_parquet(out / corpus / "*.parquet").to_dicts() if r["row_id"] in picked]
            assert all(r["split"] == "train" for r in rows)
            train |= corpus_ids(rows, corpus, item_entity)
    for path in demo.values():  # the cpt-demo corpus: row ids `product:<id>`, `query:<id>`, `book:<id>`
        train |= {r["row_id"].replace("product:", "item:") for r in read_corpus(str(path), "train")}
    return train


def sft_stage() -> tuple[set[str], set[str], list[dict]]:
    from recforge.finetune.sft import BUILDERS, split_examples, split_report
    from recforge.finetune.sft_config import SFTConfig

    train, evals, reports = set(), set(), []
    for recipe in ("sft_esci_relevance_tiny.yaml", "sft_goodbooks_tags_tiny.yaml"):
        cfg = load_recipe(SFTConfig, REPO / "finetune/recipes" / recipe, ["max_eval_examples=null"])
        examples = BUILDERS[cfg.task](cfg)
        t, e = split_examples(cfg, examples)
        train |= {x["group"] for x in t}
        evals |= {x["group"] for x in e}
        reports.append(split_report(cfg, examples, t))
    return train, evals, reports


def align_stage(goodbooks_pairs: Path) -> tuple[set[str], set[str], list[dict]]:
    from recforge.align.align_config import AlignConfig
    from recforge.align.pairs import load_align_data

    train, evals, reports = set(), set(), []
    esci = load_recipe(AlignConfig, REPO / "align/recipes/esci_minilm.yaml")
    data = load_align_data(esci.data, esci.split)
    train |= {p["anchor_id"] for p in data.train_pairs}  # already `query:<id>`
    evals |= typed("query", data.task.queries, "item")
    reports.append(data.notes["leakage"])
    larr = load_recipe(AlignConfig, REPO / "align/recipes/goodbooks_larr.yaml", [f"data.pairs_path={goodbooks_pairs}"])
    data = load_align_data(larr.data, larr.split)
    train |= pair_ids(data.train_pairs, "book")
    for q in data.task.queries:  # `kind:anchor_id`
        kind, anchor = q.split(":", 1)
        unit = PAIR_ENTITY[kind][0]
        evals |= events(anchor, data.task.qrels.get(q, {})) if unit is None else typed(unit, [anchor], "book")
    reports.append(data.notes["leakage"])
    return train, evals, reports


def tags_eval_stage(tmp_path: Path) -> tuple[set[str], dict]:
    from recforge.generate.generate_config import GenerateConfig
    from recforge.generate.inputs import read_records
    from recforge.generate.tag_eval import evaluate_tags

    cfg = load_recipe(GenerateConfig, REPO / "generate/recipes/goodbooks_tags.yaml", [f"out_dir={tmp_path}"])
    scored = {rid for rid, _ in read_records(cfg, tmp_path / "rejects.jsonl")}
    result = evaluate_tags({}, cfg.input.path, ids=scored)
    assert result["books"] == len(scored) == 401
    return typed("book", scored, "book"), result


def test_chained_stages_hold_out_one_eval_set_and_never_train_on_it(tmp_path):
    from recforge.finetune.demo import write_sample_corpora

    esci, goodbooks = tmp_path / "data_esci", tmp_path / "data_goodbooks"
    assert main(["data", str(REPO / "data_recipes/recipes/esci_search.yaml"), f"out_dir={esci}"]) == 0
    assert main(["data", str(REPO / "data_recipes/recipes/goodbooks.yaml"), f"out_dir={goodbooks}", "mix.total_rows=2000",
                 "pairs.user_item.max_pairs_per_user=3"]) == 0
    esci_train, esci_eval, esci_manifest = data_stage(esci, "item")
    gb_train, gb_eval, gb_manifest = data_stage(goodbooks, "book")
    stages = {"data": (esci_train | gb_train, esci_eval | gb_eval)}
    stages["cpt"] = (cpt_stage(esci, goodbooks, write_sample_corpora(tmp_path / "cpt_corpus", max_books=None)), set())
    sft_train, sft_eval, sft_reports = sft_stage()
    stages["sft"] = (sft_train, sft_eval)
    align_train, align_eval, align_reports = align_stage(goodbooks / "pairs")
    stages["align"] = (align_train, align_eval)
    tags_eval, tag_result = tags_eval_stage(tmp_path / "generate")
    stages["tags_eval"] = (set(), tags_eval)

    order = list(stages)
    for j, later in enumerate(order):
        for earlier in order[:j]:
            leaked = stages[later][1] & stages[earlier][0]
            assert not leaked, f"{later} evaluates on ids {sorted(leaked)[:5]} that {earlier} trains on"

    # one eval set: the stages hold out the same queries and books (where they have them at all)
    queries = lambda ids: {i for i in ids if i.startswith("query:")}  # noqa: E731
    books = lambda ids: {i for i in ids if i.startswith("book:")}  # noqa: E731
    assert queries(sft_eval) == queries(esci_eval) and len(queries(esci_eval)) == 65
    assert queries(align_eval) and queries(align_eval) <= queries(esci_eval)  # align scores those with positives
    assert queries(esci_eval) - queries(align_eval) == queries(esci_eval) - queries(align_train) - queries(align_eval)
    assert books(sft_eval) == tags_eval
    assert books(gb_eval) & tags_eval and not books(gb_train) & tags_eval

    # every leakage report names the split it used, and all of them are clean
    for manifest in (esci_manifest, gb_manifest):
        assert manifest["split_rule"]["source"] == "recipe" and manifest["split_rule"]["eval_percent"]["query"] == 20
        for name, report in manifest["splits"]["leakage"].items():
            assert report["ok"] and report.get("split"), name
    for report in sft_reports + align_reports:
        assert report["ok"] and report["eval_ids_in_train"] == 0 and report["split"]
    assert "book:<id>" in tag_result["split_rule"]


def test_a_salt_override_moves_every_stage_together(tmp_path):
    """The rule is one: a recipe's `split.salt` draws another eval set, and the SFT recipe with the same salt follows."""
    from recforge.finetune.sft import relevance_examples, split_examples
    from recforge.finetune.sft_config import SFTConfig

    out = tmp_path / "esci"
    assert main(["data", str(REPO / "data_recipes/recipes/esci_search.yaml"), f"out_dir={out}", "split.salt=v2"]) == 0
    _, data_eval, manifest = data_stage(out, "item")
    assert manifest["split_rule"]["salt"] == "v2"
    cfg = load_recipe(SFTConfig, REPO / "finetune/recipes/sft_esci_relevance_tiny.yaml", ["max_eval_examples=null", "split.salt=v2"])
    _, evals = split_examples(cfg, relevance_examples(cfg))
    moved = {e["group"] for e in evals}
    assert moved == {i for i in data_eval if i.startswith("query:")}
    default_cfg = load_recipe(SFTConfig, REPO / "finetune/recipes/sft_esci_relevance_tiny.yaml", ["max_eval_examples=null"])
    assert moved != {e["group"] for e in split_examples(default_cfg, relevance_examples(default_cfg))[1]}


@pytest.mark.parametrize("entity", ["query", "item", "user", "book", "doc"])
def test_the_rule_is_the_documented_formula(entity):
    import hashlib

    from recforge.splits import SplitRule, is_eval

    rule = SplitRule(salt="s")
    percent = getattr(rule.eval_percent, entity)
    for i in range(300):
        expected = int(hashlib.sha256(f"s{entity}:{i}".encode()).hexdigest(), 16) % 100 < percent
        assert is_eval(entity, i, rule) == is_eval(entity, str(i), rule) == expected
