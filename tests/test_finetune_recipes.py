"""Shipped recipes: every one validates, and each GPU variant differs from its tiny twin only where it must."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.config import load_recipe
from recforge.finetune.cpt_config import CPTConfig
from recforge.finetune.sft_config import SFTConfig

RECIPES = Path(__file__).resolve().parents[1] / "finetune" / "recipes"
PAIRS = [
    ("cpt_esci_tiny.yaml", "cpt_esci_gpu.yaml", CPTConfig),
    ("cpt_esci_replay_tiny.yaml", "cpt_esci_replay_gpu.yaml", CPTConfig),
    ("cpt_esci_replay_tiny.yaml", "cpt_esci_qlora_gpu.yaml", CPTConfig),
    ("sft_esci_relevance_tiny.yaml", "sft_esci_relevance_gpu.yaml", SFTConfig),
    ("sft_goodbooks_tags_tiny.yaml", "sft_goodbooks_tags_gpu.yaml", SFTConfig),
]
# what may differ between a CPU and a GPU run of the same job
ALLOWED = {"model.path", "model.revision", "model.dtype", "model.attn_implementation", "model.gradient_checkpointing",
           "mode", "lora.bnb_4bit_compute_dtype", "max_length", "training.per_device_train_batch_size",
           "training.gradient_accumulation_steps", "training.bf16", "training.learning_rate", "training.save_steps",
           # a random-weight 5M model trained from scratch needs more passes and warm-up than a pretrained one
           "training.num_train_epochs", "training.warmup_steps",
           "out_dir"}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@pytest.mark.parametrize("tiny,gpu,cls", PAIRS)
def test_gpu_variant_differs_only_where_it_must(tiny, gpu, cls):
    a = flat(load_recipe(cls, RECIPES / tiny).model_dump())
    b = flat(load_recipe(cls, RECIPES / gpu).model_dump())
    differing = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differing <= ALLOWED, differing - ALLOWED
    assert b["model.dtype"] == "bfloat16" and b["training.bf16"] is True
    assert b["model.attn_implementation"] == "flash_attention_2" and b["model.gradient_checkpointing"] is True


def test_every_recipe_validates():
    for path in sorted(RECIPES.glob("*.yaml")):
        cls = SFTConfig if path.name.startswith("sft_") else CPTConfig
        cfg = load_recipe(cls, path)
        assert cfg.out_dir.startswith("runs/"), path.name
