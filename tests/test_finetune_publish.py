"""`recforge publish`: adapter + tokenizer + card, PeftModel reload, merge with logit parity, hub push boundary."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
import yaml

from recforge.cli import main
from recforge.config import RecforgeError
from recforge.finetune.demo import esci_rows, write_corpus

SECRET = "hf_TESTsecretTOKEN0123456789"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pubrun")
    corpus = write_corpus(esci_rows()[:60], d / "esci.parquet")
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "mode": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"esci": {"path": str(corpus), "split": None}},
                 "eval": {"esci": {"path": str(corpus), "max_rows": 10}}},
        "max_length": 64,
        "tokens": {"add": ["<|startofpiece|>", "<|endofpiece|>"]},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
        "out_dir": str(d / "run"),
    }
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["cpt", str(d / "r.yaml")]) == 0
    return d / "run"


def test_publish_with_merge_loads_and_matches(lora_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pub"
    assert main(["publish", str(lora_run), "--out", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "vLLM" in printed and "--merge" in printed  # new token rows: vLLM's LoRA loader would drop them
    if importlib.util.find_spec("vllm") is not None:  # the merged model (with its 2 new token rows) loads in vLLM for real
        assert "vLLM check (merged): loaded, greedy tokens match transformers on 3/3 sample texts" in printed
        assert "vLLM check (adapter)" not in printed  # its new embedding rows cannot be served through LoRARequest

    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(tiny_model_dir)
    run_manifest = json.loads((lora_run / "manifest.json").read_text())
    assert meta["recforge"]["datasets"][0]["sha256"] == run_manifest["inputs"][0]["sha256"]
    assert "eval_after" in meta["recforge"]["metrics"]
    assert "mode: lora" in card  # resolved config embedded

    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tok))
    adapter = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    batch = tok(["<|startofpiece|>kids socks<|endofpiece|>", "usb c charger 20w"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, m = adapter(**batch).logits, merged(**batch).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        b = plain(input_ids=batch["input_ids"].clamp(max=4095), attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert (a - m).abs()[mask].max() <= 1e-3
    assert (a[..., :4096] - b).abs()[mask].max() > 1e-2  # the adapter really changes the model
    assert json.loads((out / "manifest.json").read_text())["merge_max_logit_diff"] <= 1e-3


def test_merge_refused_when_parity_fails(lora_run, tiny_model_dir, tmp_path):
    """A bf16 base: the merged bf16 weights no longer reproduce the adapter's fp32 logits -> refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.publish import copy_model_files, merge_with_parity

    bf16 = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16)
    out = tmp_path / "pub"
    out.mkdir()
    copy_model_files(lora_run / "model", out)
    config = yaml.safe_load((lora_run / "resolved_config.yaml").read_text())
    config["model"]["path"] = str(bf16)
    with pytest.raises(RecforgeError, match="merged model refused"):
        merge_with_parity(config, out, AutoTokenizer.from_pretrained(out), out, 1e-3, [])
    assert not (out / "merged").exists() and not (out / ".merged.tmp").exists()


def test_push_uses_env_token_and_never_shows_it(lora_run, tmp_path, monkeypatch, capsys, caplog):
    """The hub is the boundary that cannot run here: HfApi's two network calls are recorded instead."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, self.token, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        from pathlib import Path

        calls.append(("upload", repo_id, self.token, sorted(p.name for p in Path(folder_path).iterdir())))
        return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    out = tmp_path / "pub"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert main(["publish", str(lora_run), "--out", str(out), "--push-to-hub", "me/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and not calls

    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    assert main(["publish", str(lora_run), "--out", str(out), "--push-to-hub", "me/x", "--vllm-check", "off"]) == 0
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[0][2] == SECRET  # the token reached the client
    assert {"README.md", "adapter_model.safetensors", "tokenizer.json"} <= set(calls[1][3])
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
