"""`recforge cpt` end to end on the tiny model: LoRA + added tokens, outputs, reload, errors, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recforge.cli import main
from recforge.finetune.demo import esci_rows, goodbooks_rows, write_corpus

PIECES = ["<|startofpiece|>", "<|endofpiece|>"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    esci = esci_rows()[:120]
    # CPRM-style field pieces, as the data manifest's special tokens would be used in the text
    for r in esci:
        r["documents"] = [f"{PIECES[0]}{doc}{PIECES[1]}" for doc in r["documents"]]
    manifest = d / "manifest.json"
    manifest.write_text(json.dumps({"special_tokens": PIECES}))
    return {
        "esci": write_corpus(esci, d / "esci.parquet"),
        "goodbooks": write_corpus(goodbooks_rows(120), d / "goodbooks.parquet"),
        "manifest": manifest,
    }


def write_recipe(path: Path, model_dir, corpora, out_dir, **over) -> Path:
    recipe = {
        "model": {"path": str(model_dir)},
        "mode": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "train": {"esci": {"path": str(corpora["esci"]), "split": None}},
            "eval": {"esci": {"path": str(corpora["esci"]), "max_rows": 20},
                     "goodbooks": {"path": str(corpora["goodbooks"]), "max_rows": 20}},
        },
        "packing": "isolated",
        "max_length": 64,
        "tokens": {"from_manifest": str(corpora["manifest"])},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                     "eval_steps": 3, "save_steps": 3},
        "seed": 0,
        "out_dir": str(out_dir),
    }
    for key, value in over.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_lora_cpt_with_added_tokens_trains_saves_and_reloads(tiny_model_dir, corpora, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpora, out)
    assert main(["cpt", str(recipe)]) == 0

    model_dir = out / "model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "added_tokens_recforge.json"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("*.bin"))  # safetensors only
    for name in ("report.json", "loss.png", "perplexity.png", "manifest.json", "resolved_config.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["sources"]) == {"esci", "goodbooks"}
    esci = report["sources"]["esci"]
    assert esci["after"]["perplexity"] < esci["before"]["perplexity"]  # trained on that text
    assert len(report["eval_loss"]["esci"]) >= 3  # before, at eval steps, after
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["added_tokens"] == PIECES
    assert manifest["train"]["steps"] == 4

    # the tokenizer saved with the adapter knows the pieces as single tokens
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.convert_tokens_to_ids(PIECES)
    assert len(tok("<|startofpiece|>x", add_special_tokens=False)["input_ids"]) == 2
    assert all(i >= 4096 for i in ids)

    # reload: base resized to the saved tokenizer, then the adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    orig_in = base.get_input_embeddings().weight.detach().clone()
    orig_out = base.get_output_embeddings().weight.detach().clone()
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, model_dir)
    idx = torch.tensor(ids)
    emb_rows = model.get_input_embeddings()(idx).detach()
    mean_in = orig_in.mean(0)
    # new rows changed in training (started at the mean of the existing rows)
    assert (emb_rows - mean_in).abs().max() > 1e-4
    # lm_head rows of the new tokens are trainable too: the logit of a new token differs from the mean-init head
    hidden = torch.randn(1, 1, base.config.hidden_size)
    head_logits = model.get_output_embeddings()(hidden)[0, 0, idx]
    mean_head_logits = hidden[0, 0] @ orig_out.mean(0)
    assert (head_logits - mean_head_logits).abs().max() > 1e-5
    # and a second reload gives the very same rows (they survive save + reload)
    base2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base2.resize_token_embeddings(len(tok))
    model2 = PeftModel.from_pretrained(base2, model_dir)
    assert torch.equal(model2.get_input_embeddings()(idx), model.get_input_embeddings()(idx))
    # old rows untouched under LoRA
    assert torch.equal(model.get_input_embeddings()(torch.tensor([5, 100])), orig_in[[5, 100]])


def test_strip_markup_and_a_nulled_source(tiny_model_dir, corpora, tmp_path):
    from recforge.config import load_recipe
    from recforge.finetune.cpt import strip_markup
    from recforge.finetune.cpt_config import CPTConfig

    assert strip_markup("<|title|>Dune<|endofpiece|><|authors|>Frank Herbert<|endofpiece|>") == "Dune\nFrank Herbert"
    assert strip_markup("<|startofpiece|>Title: Bags<|endofpiece|>") == "Title: Bags"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpora, tmp_path / "o",
                          **{"data.train.replay": {"path": str(corpora["goodbooks"])}})
    assert set(load_recipe(CPTConfig, recipe).data.train) == {"esci", "replay"}
    # `data.train.replay=null` is the without-replay arm of the same recipe
    cfg = load_recipe(CPTConfig, recipe, ["data.train.replay=null", "data.eval.goodbooks=null"])
    assert set(cfg.data.train) == {"esci"} and set(cfg.data.eval) == {"esci"}

    # an eval source with strip_markup scores the same documents without a single field-piece token
    from transformers import AutoTokenizer

    from recforge.finetune.cpt import build_eval_datasets

    plain = {"path": str(corpora["esci"]), "max_rows": 20, "strip_markup": True}
    cfg = load_recipe(CPTConfig, recipe, [f"data.eval.esci_plain={json.dumps(plain)}", "data.eval.goodbooks=null"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": PIECES})
    piece_ids = set(tok.convert_tokens_to_ids(PIECES))
    sets = build_eval_datasets(cfg, tok, None)

    def tokens(ds):
        return [t for row in ds.examples for seg in row for t in seg]

    assert piece_ids & set(tokens(sets["esci"])) and not piece_ids & set(tokens(sets["esci_plain"]))
    assert len(sets["esci_plain"].examples) > 0 and sets["esci_plain"].n_tokens() < sets["esci"].n_tokens()


def test_recipe_and_data_errors_are_clear(tiny_model_dir, corpora, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpora, tmp_path / "o")
    assert main(["cpt", str(recipe), "training.max_stepz=3"]) == 2
    assert "training.max_stepz" in capsys.readouterr().err
    assert main(["cpt", str(recipe), f"data.train.esci.path={tmp_path}/missing.parquet"]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert main(["cpt", str(recipe), f"data.train.esci.path={bad}"]) == 2
    assert "bad.parquet" in capsys.readouterr().err
    assert main(["cpt", str(recipe), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _final_losses(out: Path) -> tuple[float, float]:
    state = json.loads((out / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    train = [e["loss"] for e in state["log_history"] if "loss" in e and e.get("step") == 12]
    report = json.loads((out / "report.json").read_text())
    return train[-1], report["sources"]["esci"]["after"]["loss"]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_loss(tiny_model_dir, corpora, tmp_path):
    over = {"mode": "full", "training.max_steps": 12, "training.save_steps": 4, "training.eval_steps": None,
            "training.save_total_limit": None}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recforge"]

    ref = tmp_path / "ref"
    write_recipe(tmp_path / "ref.yaml", tiny_model_dir, corpora, ref, **over)
    subprocess.run(cmd + ["cpt", str(tmp_path / "ref.yaml")], check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    write_recipe(tmp_path / "k.yaml", tiny_model_dir, corpora, out, **over)
    proc = subprocess.Popen(cmd + ["cpt", str(tmp_path / "k.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()  # really interrupted before the end
    subprocess.run(cmd + ["cpt", str(tmp_path / "k.yaml"), "--resume"], check=True, env=env, capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"].endswith(("checkpoint-4", "checkpoint-8"))

    ref_train, ref_eval = _final_losses(ref)
    got_train, got_eval = _final_losses(out)
    assert abs(ref_train - got_train) <= 1e-5
    assert abs(ref_eval - got_eval) <= 1e-5


@pytest.mark.slow
def test_make_cpt_demo_shows_domain_gain_and_replay_protection(tiny_model_dir, tmp_path):
    """`make cpt`: domain perplexity falls >= 30%; replay keeps goodbooks perplexity below no-replay."""
    assert main(["cpt-demo", "--out", str(tmp_path), "--base-model", str(tiny_model_dir)]) == 0
    summary = json.loads((tmp_path / "demo_report.json").read_text())
    assert summary["checks"]["domain_perplexity_fall_no_replay"] >= 0.30
    assert summary["checks"]["domain_perplexity_fall_replay"] >= 0.30
    assert summary["replay"]["goodbooks"]["after"] < summary["no_replay"]["goodbooks"]["after"]
    for run in ("pretrain", "esci_no_replay", "esci_replay"):
        for name in ("report.json", "loss.png", "perplexity.png", "manifest.json"):
            assert (tmp_path / run / name).is_file(), (run, name)


def test_chunked_loss_trains_the_same_run(tiny_model_dir, corpora, tmp_path):
    """`training.chunked_loss` (added-token rows included) logs the stock run's losses and perplexities."""
    reports = {}
    for chunked in (False, True):
        out = tmp_path / f"chunked_{chunked}"
        recipe = write_recipe(tmp_path / f"r{chunked}.yaml", tiny_model_dir, corpora, out,
                              **{"training.chunked_loss": chunked, "training.eval_steps": None})
        assert main(["cpt", str(recipe)]) == 0
        reports[chunked] = json.loads((out / "report.json").read_text())
    stock, chunked = reports[False], reports[True]
    assert [s for s, _ in chunked["train_loss"]] == [s for s, _ in stock["train_loss"]]
    for (_, a), (_, b) in zip(stock["train_loss"], chunked["train_loss"]):
        assert b == pytest.approx(a, rel=1e-3)
    for source in stock["sources"]:
        assert chunked["sources"][source]["after"]["perplexity"] == pytest.approx(
            stock["sources"][source]["after"]["perplexity"], rel=1e-3)
    assert stock["train_loss"][-1][1] < stock["train_loss"][0][1]  # it did train
