"""QLoRA: bitsandbytes 4-bit NF4 base + LoRA trains here on CPU; where 4-bit cannot run, it fails before loading."""

from __future__ import annotations

import math

import pytest
import yaml

from recforge.cli import main
from recforge.finetune.demo import esci_rows, write_corpus


def _recipe(tmp_path, tiny_model_dir, **extra):
    corpus = write_corpus(esci_rows()[:40], tmp_path / "esci.parquet")
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "mode": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"esci": {"path": str(corpus), "split": None}}},
        "max_length": 64,
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
        "out_dir": str(tmp_path / "run"),
        **extra,
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_qlora_trains_a_4bit_base(tiny_model_dir, tmp_path):
    import torch
    from bitsandbytes.nn import Linear4bit

    from recforge.config import load_recipe
    from recforge.finetune.cpt import make_trainer
    from recforge.finetune.cpt_config import CPTConfig

    cfg = load_recipe(CPTConfig, _recipe(tmp_path, tiny_model_dir))
    trainer = make_trainer(cfg, tmp_path / "run")
    base_layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, Linear4bit) and base_layer.weight.quant_type == "nf4"
    lora_a = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    lora_b = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    b_before = lora_b.detach().clone()
    trainer.train()
    assert not torch.equal(b_before, lora_b.detach())  # the adapter trained through the 4-bit layer
    assert lora_a.dtype == torch.float32
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_qlora_where_unsupported_fails_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Simulates a platform without 4-bit kernels (the probe is the boundary): clear error, no weights loaded."""
    import bitsandbytes.functional as bnbf
    import transformers

    def no_4bit(*a, **k):
        raise RuntimeError("4-bit quantization is not available on this device")

    loaded = []
    monkeypatch.setattr(bnbf, "quantize_4bit", no_4bit)
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(a) or real(*a, **k))
    assert main(["cpt", str(_recipe(tmp_path, tiny_model_dir))]) == 2
    err = capsys.readouterr().err
    assert "qlora" in err and "mode: lora" in err
    assert not loaded
    assert not (tmp_path / "run" / "model").exists()
