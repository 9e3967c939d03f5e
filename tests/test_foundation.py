"""Recipes, overrides, run manifests, the CLI error path and the offline models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import Field

from recforge.config import RecforgeError, RecipeModel, load_recipe
from recforge.io import atomic_write_text, resolve_path
from recforge.manifest import RunRecorder


class SplitCfg(RecipeModel):
    by: str = "hash"
    eval_fraction: float = 0.1


class DemoRecipe(RecipeModel):
    out_dir: str
    seed: int = 0
    split: SplitCfg = Field(default_factory=SplitCfg)
    sources: list[str] = Field(default_factory=list)


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_overrides_reach_nested_keys_and_are_typed(tmp_path):
    path = write_recipe(tmp_path, {"out_dir": "runs/a", "split": {"by": "time"}})
    cfg = load_recipe(DemoRecipe, path, ["seed=7", "split.eval_fraction=0.25", "sources=[a, b]", "out_dir=/x/y"])
    assert (cfg.seed, cfg.split.by, cfg.split.eval_fraction, cfg.sources, cfg.out_dir) == (7, "time", 0.25, ["a", "b"], "/x/y")


def test_unknown_key_and_wrong_type_name_the_file_and_dotted_key(tmp_path):
    path = write_recipe(tmp_path, {"out_dir": "runs/a", "split": {"bye": "time"}})
    with pytest.raises(RecforgeError) as err:
        load_recipe(DemoRecipe, path)
    assert "demo.yaml" in str(err.value) and "key 'split.bye': unknown key" in str(err.value)

    path = write_recipe(tmp_path, {"out_dir": "runs/a"})
    with pytest.raises(RecforgeError) as err:
        load_recipe(DemoRecipe, path, ["split.eval_fraction=lots"])
    assert "key 'split.eval_fraction'" in str(err.value) and "split.eval_fraction=lots" in str(err.value)

    with pytest.raises(RecforgeError, match="not of the form key.sub=value"):
        load_recipe(DemoRecipe, path, ["seed"])
    with pytest.raises(RecforgeError, match="recipe file not found"):
        load_recipe(DemoRecipe, tmp_path / "missing.yaml")


def test_run_writes_resolved_config_and_manifest_with_input_hashes(tmp_path):
    cfg = DemoRecipe(out_dir=str(tmp_path / "run"), seed=3)
    data = tmp_path / "in.txt"
    data.write_text("hello\n")
    run = RunRecorder(cfg.out_dir, "demo", cfg, seed=cfg.seed)
    run.add_input(data, name="text", rows=1)
    run.rejects.update({"empty_text": 2})
    run.finish()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert manifest["seed"] == 3 and manifest["rejects"] == {"total": 2, "by_reason": {"empty_text": 2}}
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved == {"out_dir": cfg.out_dir, "seed": 3, "split": {"by": "hash", "eval_fraction": 0.1}, "sources": []}


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from recforge.io import atomic_path

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise Boom
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_cli_prints_user_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recforge", "model", "tiny", "--out", str(tmp_path / "m"),
                           "--corpus", str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "recforge: error: tiny model corpus file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_paths_resolve_to_the_shipped_data():
    assert resolve_path("sample://esci_us_titles/products.jsonl.gz").is_file()
    assert (resolve_path("sample://goodbooks_10k_catalog") / "README.md").read_text().count("CC BY-SA 4.0") >= 1


def test_tiny_model_loads_like_a_hub_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 2e7
    ids = tok("Harry Potter and the wireless earbuds")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "Harry Potter and the wireless earbuds"
    assert len(ids) < 15  # BPE trained on the catalogue merges its words
    chat = tok.apply_chat_template([{"role": "user", "content": "tags?"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\ntags?<|im_end|>\n<|im_start|>assistant\n"
    assert {tok.eos_token, tok.pad_token} == {"</s>", "<pad>"} and tok.pad_token_id != tok.eos_token_id
    with torch.no_grad():
        logits = model(**tok(["a b", "c"], return_tensors="pt", padding=True)).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_minilm_weights_match_the_pinned_hash(minilm_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    vecs = model.encode(["wireless earbuds", "bluetooth headphones", "garden hose"], normalize_embeddings=True)
    assert vecs.shape == (3, 384)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2  # a real pretrained encoder, not random weights
