"""`recforge sft`: task examples, held-out splits, metrics, and the tags / distill runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recforge.cli import main
from recforge.config import load_recipe
from recforge.finetune.sft import (
    relevance_examples,
    relevance_metrics,
    split_examples,
    tag_metrics,
    tags_examples,
)
from recforge.finetune.sft_config import SFTConfig
from recforge.shelf_tags import is_reader_shelf

RECIPES = Path(__file__).resolve().parents[1] / "finetune" / "recipes"


def test_relevance_metrics_accuracy_and_macro_f1():
    labels = ["exact", "substitute", "complement", "irrelevant"]
    preds = ["exact", "Irrelevant.", "exact match", "substitute", "blah"]
    gold = ["exact", "irrelevant", "substitute", "substitute", "irrelevant"]
    m = relevance_metrics(preds, gold, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per class F1: exact 2/3, substitute 2/3, irrelevant 2/3, complement 0 -> macro 0.5
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["parsed"] == pytest.approx(4 / 5)


def test_tag_metrics_are_eval_tags_p_at_k():
    # P@k = hits in the first k / k (not hits / answers): a one-tag answer cannot score 1.0; the truth is read
    # like `recforge eval tags` reads it, predictions cleaned by the same reader-shelf rule (`to-read` is no tag)
    m = tag_metrics(["fantasy, magic, school", "to-read, horror", ""], [["fantasy", "magic"], ["horror"], ["drama"]], k=5)
    assert m["precision@5"] == pytest.approx(round((2 / 5 + 1 / 5 + 0) / 3, 4))
    assert m["recall@5"] == pytest.approx(round((1 + 1 + 0) / 3, 4))


def test_examples_split_by_group_and_skip_status_shelves():
    cfg = load_recipe(SFTConfig, RECIPES / "sft_goodbooks_tags_tiny.yaml")
    examples = tags_examples(cfg)
    assert len(examples) > 1500
    assert not any(t in cfg.tags.skip_tags for e in examples for t in json.loads(e["target"]))
    # targets are the shelves `recforge eval tags` scores against: no reader shelf (to-read, my-favorites, ...)
    assert not any(is_reader_shelf(t) for e in examples for t in json.loads(e["target"]))
    # in one global order (no pair of tags appears in both orders), so greedy decoding never repeats a tag
    targets = [json.loads(e["target"]) for e in examples]
    seen = {(a, b) for tags in targets for i, a in enumerate(tags) for b in tags[i + 1:]}
    assert not any((b, a) in seen for a, b in seen)
    assert sum(json.loads(e["target"])[0] == "fiction" for e in examples) > len(examples) / 3
    by_count = tags_examples(cfg.model_copy(update={"tags": cfg.tags.model_copy(update={"order": "count"})}))
    mockingbird = next(e for e in by_count if e["id"] == "book:4")
    assert json.loads(mockingbird["target"])[0] == "classics"  # its most used book shelf
    train, evals = split_examples(cfg.model_copy(update={"max_eval_examples": None}), examples)
    assert not {e["id"] for e in train} & {e["id"] for e in evals}
    assert 0.1 < len(evals) / len(examples) < 0.3
    rel = load_recipe(SFTConfig, RECIPES / "sft_esci_relevance_tiny.yaml")
    r_train, r_eval = split_examples(rel.model_copy(update={"max_eval_examples": None}), relevance_examples(rel))
    assert not {e["group"] for e in r_train} & {e["group"] for e in r_eval}  # held-out queries never trained on
    assert {json.loads(e["target"]) for e in r_train} <= set(rel.relevance.labels.values())


@pytest.mark.slow
def test_tags_sft_end_to_end_with_merge(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tags"
    assert main(["sft", str(RECIPES / "sft_goodbooks_tags_tiny.yaml"), f"model.path={tiny_model_dir}",
                 f"out_dir={out}", "mode=lora", "training.max_steps=4", "max_eval_examples=6", "max_new_tokens=8",
                 "max_train_examples=64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["n_eval"] == 6
    assert {"precision@5", "recall@5", "eval_loss"} <= set(metrics)
    assert metrics["merge_max_logit_diff"] <= 1e-3
    held_out = set(json.loads((out / "eval_ids.json").read_text())["eval_ids"])
    assert len(held_out) == 6
    assert (out / "model" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # what generate loads as its tagger
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert merged.config.vocab_size == len(tok)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "sft" and manifest["inputs"][0]["sha256"]


def test_full_tags_sft_writes_a_loadable_merged_model(tiny_model_dir, tmp_path):
    """The shipped tags recipe trains the full tiny model; `merged/` is still what generate loads."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tags_full"
    assert main(["sft", str(RECIPES / "sft_goodbooks_tags_tiny.yaml"), f"model.path={tiny_model_dir}", f"out_dir={out}",
                 "training.max_steps=2", "max_train_examples=16", "max_eval_examples=2", "max_new_tokens=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_seconds"] > 0
    assert not (out / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), trained.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert (out / "merged" / "tokenizer_config.json").is_file() and not (out / "merged" / "training_args.bin").exists()


def test_distill_sft_reads_a_features_table(tiny_model_dir, tmp_path):
    import pyarrow as pa

    from recforge.io import write_parquet_atomic
    from recforge.records import features_schema

    from recforge.finetune.demo import goodbooks_rows

    ids = [r["row_id"].split(":")[1] for r in goodbooks_rows(8)]  # books in the shipped catalogue
    rows = [{"entity_type": "item", "entity_id": i, "tags": ["classic", "novel"], "summary": f"Book {i}.",
             "pseudo_queries": [], "knowledge": ""} for i in ids]
    rows.append({"entity_type": "item", "entity_id": "no-such-book", "tags": ["x"], "summary": "",
                 "pseudo_queries": [], "knowledge": ""})
    rows.append({"entity_type": "user", "entity_id": "u1", "tags": ["x"], "summary": "", "pseudo_queries": [], "knowledge": ""})
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=features_schema()), tmp_path / "features.parquet")
    out = tmp_path / "distill"
    assert main(["sft", str(RECIPES / "sft_distill_tiny.yaml"), f"model.path={tiny_model_dir}", f"out_dir={out}",
                 f"distill.features={tmp_path / 'features.parquet'}", "training.max_steps=2", "split.eval_percent.book=30",
                 "max_new_tokens=4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_eval"] == 8  # the user row and unknown ids are not items to distil
    assert "precision@5" in metrics

    assert main(["sft", str(RECIPES / "sft_distill_tiny.yaml"), f"model.path={tiny_model_dir}",
                 f"out_dir={tmp_path / 'x'}", f"distill.features={tmp_path / 'nope.parquet'}"]) == 2
