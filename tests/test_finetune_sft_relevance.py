"""SFT relevance as generation (ESCI query + product -> grade): prompts that fit, held-out queries, metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from recforge.cli import main
from recforge.config import RecforgeError, load_recipe
from recforge.finetune.sft import fit_to_length, relevance_examples, split_examples
from recforge.finetune.sft_config import SFTConfig

RECIPE = Path(__file__).resolve().parents[1] / "finetune" / "recipes" / "sft_esci_relevance_tiny.yaml"


def _chat_ids(tok, ex):
    return tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, return_dict=True)["input_ids"]


def test_long_prompts_are_trimmed_so_the_answer_always_survives(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_recipe(SFTConfig, RECIPE, [f"model.path={tiny_model_dir}"])
    examples = relevance_examples(cfg)[:80]
    untouched = {e["id"]: e["prompt"][-1]["content"] for e in examples}
    assert sum(len(_chat_ids(tok, e)) > 96 for e in examples) > 10  # the sample has many long titles

    trimmed = fit_to_length(tok, examples, 96)

    assert trimmed == sum(e["prompt"][-1]["content"] != untouched[e["id"]] for e in examples) > 10
    for e in examples:
        ids = _chat_ids(tok, e)
        assert len(ids) <= 96
        content = e["prompt"][-1]["content"]
        if content != untouched[e["id"]]:
            # the instruction and the query are kept; only the end of the product text is cut
            assert content.endswith("…") and "Query:" in content
            assert untouched[e["id"]].startswith(content[:-1].rstrip()[:40])
        # the answer is the last thing in the (possibly trimmed) sequence, whole
        assert tok.decode(ids).rstrip().endswith(e["completion"][0]["content"] + "<|im_end|>")

    with pytest.raises(RecforgeError, match="max_length=20"):
        fit_to_length(tok, examples[:5], 20)


def test_held_out_queries_never_train():
    cfg = load_recipe(SFTConfig, RECIPE, ["model.path=unused"])
    train, evals = split_examples(cfg, relevance_examples(cfg))
    train_queries = {e["group"] for e in train}
    assert evals and not train_queries & {e["group"] for e in evals}


def test_relevance_sft_end_to_end_scores_held_out_queries(tiny_model_dir, tmp_path):
    from recforge.splits import is_eval

    out = tmp_path / "rel"
    from sklearn.metrics import f1_score

    from recforge.finetune.sft import relevance_metrics

    assert main(["sft", str(RECIPE), f"model.path={tiny_model_dir}", f"out_dir={out}", "mode=full", "merge=false",
                 "training.max_steps=3", "max_train_examples=24", "max_eval_examples=5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["n_train"] == 24 and metrics["n_eval"] == 5
    # with 5 held-out examples metrics.json lists every prediction: the scores are recomputed from them by hand
    labels = ["exact", "substitute", "complement", "irrelevant"]
    examples = metrics["examples"]
    assert len(examples) == 5
    got = [next((w for w in re.findall(r"[a-z]+", e["prediction"].lower()) if w in labels), "none")
           for e in examples]
    gold = [e["target"] for e in examples]
    assert metrics["accuracy"] == pytest.approx(sum(g == t for g, t in zip(got, gold)) / 5)
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, got, labels=labels, average="macro", zero_division=0))
    assert metrics == {**metrics, **relevance_metrics([e["prediction"] for e in examples], gold, labels)}
    base = metrics["baseline_majority_label"]
    majority = base["label"]
    assert base["accuracy"] == pytest.approx(sum(t == majority for t in gold) / 5)
    eval_ids = json.loads((out / "eval_ids.json").read_text())["eval_ids"]
    assert len(eval_ids) == 5 and all(is_eval("query", i.split("|")[0]) for i in eval_ids)
    assert {e["target"] for e in metrics["examples"]} <= {"exact", "substitute", "complement", "irrelevant"}


def test_an_answer_budget_that_cuts_labels_fails_before_training(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rel"
    assert main(["sft", str(RECIPE), f"model.path={tiny_model_dir}", f"out_dir={out}", "max_new_tokens=2"]) == 2
    assert "max_new_tokens=2 cannot hold the longest label" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
