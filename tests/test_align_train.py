"""`recforge align` end to end: train, export (plain sentence-transformers loads it), evaluate base vs tuned."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recforge.align.align_config import AlignConfig
from recforge.config import RecforgeError, load_recipe

REPO = Path(__file__).resolve().parents[1]

# Loads the export in a fresh interpreter that never imports recforge, encodes the probe texts under
# right and left padding and compares with the vectors saved at the end of training.
PLAIN_ST_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sentence_transformers import SentenceTransformer
    run = sys.argv[1]
    probe = json.load(open(run + "/export_check_texts.json"))
    ref = np.load(run + "/export_check_vectors.npz")
    model = SentenceTransformer(run + "/model", device="cpu")
    out = {}
    for side in ("right", "left"):
        model[0].tokenizer.padding_side = side
        v = model.encode(probe["texts"], prompt_name=probe["prompt_name"], batch_size=8)
        r = ref[side]
        out[side] = float(((v * r).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(r, axis=1)).min())
    out["recforge_imported"] = any(m.startswith("recforge") for m in sys.modules)
    out["dim"] = model.get_embedding_dimension()
    out["prompts"] = model.prompts
    print(json.dumps(out))
    """
)


def plain_st_check(run_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLAIN_ST_CHECK, str(run_dir)], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tiny_recipe(tiny_model_dir, out_dir, *extra):
    return load_recipe(AlignConfig, REPO / "align/recipes/esci_tiny_lm.yaml",
                       [f"backbone.path={tiny_model_dir}", f"out_dir={out_dir}", *extra])


def test_tiny_lm_align_end_to_end_export_loads_in_plain_st(tiny_model_dir, tmp_path):
    """Fast end-to-end: a few steps on a causal LM, export, reload without recforge, same vectors."""
    from recforge.align.trainer import run_align

    cfg = tiny_recipe(tiny_model_dir, tmp_path / "run", "train.num_train_epochs=1", "train.per_device_train_batch_size=16",
                      "data.max_train_pairs=64", "backbone.max_seq_length=24")
    out = run_align(cfg)
    assert out["train"]["steps"] == 4
    assert set(out["metrics"]) == {"base", "tuned"} and out["metrics"]["tuned"]["queries"] > 30

    export = tmp_path / "run" / "model"
    modules = json.loads((export / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((export / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    contract = json.loads((export / "embedding_contract.json").read_text())
    assert contract["dimension"] == 128 and contract["normalized"] is True and contract["appended_suffix"] == "</s>"
    assert contract["prompts"] == {"query": "Query: ", "document": "Product: "} and contract["max_seq_length"] == 24
    assert all(len(d["sha256"]) == 64 for d in contract["data"])
    card = (export / "README.md").read_text()
    assert "ndcg@10" in card and "Embedding contract" in card

    check = plain_st_check(tmp_path / "run")
    assert check["recforge_imported"] is False
    assert check["right"] >= 0.9999 and check["left"] >= 0.9999
    assert check["dim"] == 128 and check["prompts"]["query"] == "Query: "

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["export_check"]["min_cosine_left_padding"] >= 0.9999
    assert manifest["inputs"] and all(i["sha256"] for i in manifest["inputs"])
    assert (tmp_path / "run" / "eval" / "retrieval_metrics.png").stat().st_size > 1000

    # training changed the model: every transformer weight matrix of the export differs from the base LM's
    import torch
    from safetensors.torch import load_file

    base = {k.removeprefix("model."): v for k, v in load_file(Path(tiny_model_dir) / "model.safetensors").items()}
    tuned = load_file(export / "model.safetensors")
    layers = [k for k in tuned if k in base and k.startswith("layers.") and k.endswith("proj.weight")]
    assert len(layers) >= 7 * 4  # q, k, v, o, gate, up, down in each of the tiny LM's 4 layers
    unchanged = [k for k in layers if torch.equal(tuned[k], base[k])]
    assert not unchanged, unchanged[:3]
    assert out["metrics"]["tuned"] != out["metrics"]["base"]


@pytest.mark.slow
def test_tiny_lm_aligned_beats_itself_unaligned(tiny_model_dir, tmp_path):
    from recforge.align.trainer import run_align

    out = run_align(tiny_recipe(tiny_model_dir, tmp_path / "run"))
    base, tuned = out["metrics"]["base"], out["metrics"]["tuned"]
    # A wide margin: over seeds 0-2 the shipped recipe goes from ~0.01 to ~0.15 NDCG@10 (bench/results/align_quality_tiny.json).
    assert tuned["ndcg@10"] > max(4 * base["ndcg@10"], base["ndcg@10"] + 0.08), (base, tuned)
    assert tuned["recall@50"] > base["recall@50"] + 0.1, (base, tuned)


@pytest.mark.slow
def test_lora_run_exports_a_merged_model(tiny_model_dir, tmp_path):
    from recforge.align.trainer import run_align

    cfg = tiny_recipe(tiny_model_dir, tmp_path / "run", "backbone.lora=true", "backbone.lora_r=16",
                      "train.num_train_epochs=2", "train.learning_rate=3e-3", "pooling.mode=compression")
    out = run_align(cfg)
    export = tmp_path / "run" / "model"
    assert not (export / "adapter_config.json").exists()
    assert json.loads((export / "embedding_contract.json").read_text())["lora_merged"] is True
    check = plain_st_check(tmp_path / "run")
    assert check["right"] >= 0.9999 and check["left"] >= 0.9999
    assert out["metrics"]["tuned"]["ndcg@10"] > out["metrics"]["base"]["ndcg@10"]


@pytest.mark.slow
def test_minilm_esci_recipe_raises_ndcg(tmp_path):
    from recforge.align.trainer import run_align

    cfg = load_recipe(AlignConfig, REPO / "align/recipes/esci_minilm.yaml", [f"out_dir={tmp_path / 'run'}"])
    out = run_align(cfg)
    assert out["metrics"]["tuned"]["ndcg@10"] > out["metrics"]["base"]["ndcg@10"]
    assert plain_st_check(tmp_path / "run")["left"] >= 0.9999


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(RecforgeError, match="loss.temprature"):
        load_recipe(AlignConfig, REPO / "align/recipes/esci_minilm.yaml", ["loss.temprature=0.1"])
    with pytest.raises(RecforgeError, match="pairs_path"):
        load_recipe(AlignConfig, REPO / "align/recipes/esci_minilm.yaml", ["data.source=pairs"])


def test_cli_reports_missing_pairs_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recforge", "align", str(REPO / "align/recipes/esci_minilm.yaml"),
                           "data.source=pairs", f"data.pairs_path={tmp_path / 'nope.parquet'}", f"out_dir={tmp_path / 'o'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "pairs file not found" in proc.stderr and "nope.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_retrieval_writes_json_markdown_png(tmp_path, minilm_dir):
    from recforge.cli import main

    rc = main(["eval", "retrieval", str(REPO / "align/recipes/eval_esci.yaml"), f"out_dir={tmp_path}",
               f"models={{untuned: {minilm_dir}}}"])
    assert rc == 0
    report = json.loads((tmp_path / "retrieval_metrics.json").read_text())
    res = report["results"]["untuned"]
    assert res["queries"] > 30 and 0.3 < res["ndcg@10"] < 1.0  # MiniLM alone already ranks ESCI titles decently
    assert "| ndcg@10 |" in (tmp_path / "retrieval_metrics.md").read_text()
    assert (tmp_path / "retrieval_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "manifest.json").read_text())["command"] == "eval retrieval"


@pytest.mark.slow
def test_multi_kind_larr_training_on_pairs_file(tiny_model_dir, tmp_path):
    """Several pair kinds train together, one weighted loss per kind (LARR), from a pairs Parquet file."""
    from recforge.align.pairs import build_esci, pairs_table
    from recforge.align.trainer import run_align
    from recforge.io import write_parquet_atomic
    from recforge.align.align_config import EsciSource

    data = build_esci(EsciSource())
    rows = [dict(p, kind="query_item") for p in data.train_pairs[:64]]
    rows += [dict(p, kind="item_item", anchor=p["positive"], anchor_id=p["positive_id"], pair_id=p["pair_id"] + ":ii")
             for p in data.train_pairs[64:128]]
    rows += [dict(p, split="eval", pair_id=p["pair_id"] + ":e") for p in data.train_pairs[128:160]]
    write_parquet_atomic(pairs_table(rows), tmp_path / "pairs.parquet")
    cfg = load_recipe(AlignConfig, REPO / "align/recipes/goodbooks_larr.yaml",
                      [f"backbone.path={tiny_model_dir}", f"out_dir={tmp_path / 'run'}", f"data.pairs_path={tmp_path / 'pairs.parquet'}",
                       "backbone.max_seq_length=24", "train.per_device_train_batch_size=16", "loss.kind_weights={query_item: 1.0, item_item: 0.3}"])
    out = run_align(cfg)
    assert out["train"]["kinds"] == {"item_item": 64, "query_item": 64}
    assert out["train"]["steps"] == 8
    assert {"final_temperature_item_item", "final_temperature_query_item"} <= set(out["train"])
    assert out["export_check"]["min_cosine_left_padding"] >= 0.9999


def test_device_auto_dtype_and_gradient_checkpointing(tiny_model_dir, tmp_path):
    """`device: auto` is CUDA when present, else CPU (an absent CUDA asked for is one clear error); an LLM
    backbone loads in `backbone.dtype` and trains with gradient checkpointing on, and the run records the device."""
    import torch

    from recforge.align.embed import resolve_device
    from recforge.align.pooling import build_embedding_model
    from recforge.align.trainer import train_model

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RecforgeError, match="device: cuda"):
            resolve_device("cuda")
    with pytest.raises(RecforgeError, match="device"):
        load_recipe(AlignConfig, REPO / "align/recipes/esci_minilm.yaml", ["device=gpu0"])

    cfg = tiny_recipe(tiny_model_dir, tmp_path / "run", "backbone.dtype=bfloat16", "backbone.gradient_checkpointing=true",
                      "train.max_steps=2", "train.per_device_train_batch_size=8", "backbone.max_seq_length=16")
    model, info = build_embedding_model(cfg.backbone, cfg.pooling, cache_root=str(tmp_path))
    lm = model[0].auto_model
    assert lm.dtype == torch.bfloat16
    pairs = [{"pair_id": f"p{i}", "anchor_id": f"q{i}", "anchor": f"query {i}", "positive_id": f"d{i}",
              "positive": f"document number {i}", "negative_id": None, "negative": None, "anchor_positive_ids": [f"d{i}"],
              "weight": 1.0, "kind": "query_item"} for i in range(16)]
    before = {k: v.detach().clone() for k, v in lm.named_parameters()}
    summary = train_model(model, pairs, cfg, tmp_path / "run", info, resolve_device(cfg.device))
    assert summary["steps"] == 2 and lm.is_gradient_checkpointing
    assert any(not torch.equal(before[k], v) for k, v in lm.named_parameters())


def test_bf16_trained_align_exports_the_vectors_it_evaluates(tiny_model_dir, tmp_path):
    """train.bf16 on CPU: the Trainer wraps forward in bf16 autocast; the export check and the tuned metrics
    must use the float32 vectors the exported folder gives (the wrapped model reached only cos 0.994)."""
    from recforge.align.trainer import run_align

    cfg = tiny_recipe(tiny_model_dir, tmp_path / "run", "train.num_train_epochs=1", "train.per_device_train_batch_size=16", "train.bf16=true",
                      "data.max_train_pairs=32", "backbone.max_seq_length=24", "eval.compare_base=false")
    out = run_align(cfg)
    # float32 against float32 agrees to ~1e-7; against the autocast-wrapped model the tiny LM reaches 0.999992
    assert out["export_check"]["min_cosine_right_padding"] >= 0.999999
    assert out["export_check"]["min_cosine_left_padding"] >= 0.999999
