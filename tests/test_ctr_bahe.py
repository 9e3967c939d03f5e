"""BAHE: the layer split, the behaviour-vector cache and its contract, the upper-layer tower, a recipe run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from recforge.align.ctr.bahe import (
    UpperTower,
    build_behaviour_matrix,
    build_model,
    encode_texts,
    load_backbone,
    optimizer,
    prepare_llm,
    right_align,
    sink_state,
    sink_token,
    split_backbone,
)
from recforge.align.ctr.config import LLMConfig, ModelConfig, TrainConfig
from recforge.align.ctr.features import FeatureContractError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer, base = load_backbone(tiny_model_dir)
    return tiny_model_dir, tokenizer, base


def test_lower_plus_upper_layers_reproduce_the_full_model(tiny):
    _, tokenizer, base = tiny
    lower, upper = split_backbone(base, 2)
    assert len(lower.layers) == 2 and len(upper.layers) == base.config.num_hidden_layers - 2
    assert lower.layers[0] is base.layers[0] and upper.layers[0] is base.layers[2]  # shared, not copied
    ids = torch.tensor([tokenizer("Dune by Frank Herbert", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        full = base(input_ids=ids).last_hidden_state
        hidden = lower(input_ids=ids).last_hidden_state
        split = upper(inputs_embeds=hidden, position_ids=torch.arange(ids.shape[1])[None]).last_hidden_state
        # a one-token behaviour: its cached vector (mean over its tokens after the sink) through the tower
        # ([sink state, vector] at positions 0, 1) is exactly the full model's state of [sink, token]
        token = ids[0, :1]
        vector = torch.from_numpy(encode_texts(lower, tokenizer, [tokenizer.decode(token)], 24, 8))
        through_tower = UpperTower(upper, sink_state(lower, tokenizer), "mean")(vector[:, None], torch.ones(1, 1, dtype=torch.bool))
        reference = base(input_ids=torch.tensor([[sink_token(tokenizer), int(token)]])).last_hidden_state[:, 1]
    assert torch.allclose(full, split, atol=1e-5)
    assert torch.allclose(through_tower, reference, atol=1e-5)
    with pytest.raises(Exception, match="lower_layers: 4 is not in 1..3"):
        split_backbone(base, 4)


def test_upper_tower_pools_a_user_vector_that_depends_on_behaviour_order(tiny):
    _, tokenizer, base = tiny
    lower, upper = split_backbone(base, 2)
    tower = UpperTower(upper, sink_state(lower, tokenizer), "mean").eval()
    h = base.config.hidden_size
    vectors = torch.randn(3, 4, h)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    vectors[1, :3] = vectors[0, [2, 1, 0]]  # the same behaviours, reversed
    with torch.no_grad():
        out = tower(vectors, mask)
        padded_differently = tower(vectors[:1, :3], mask[:1, :3])
    assert out.shape == (3, h) and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-3  # positions over behaviours: order matters
    assert torch.allclose(out[0], padded_differently[0], atol=1e-5)  # padding does not
    # histories come left-padded (most recent last): the model re-aligns them behaviour-first, order kept
    assert right_align(torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])).tolist() == [[7, 8, 9, 0, 0], [4, 5, 6, 7, 8]]


def test_behaviour_cache_is_reused_and_refused_on_a_contract_mismatch(tiny, tmp_path):
    model_dir, tokenizer, base = tiny
    llm = LLMConfig(model=str(model_dir), lower_layers=2)
    lower, _ = split_backbone(base, 2)
    texts = ["Dune", "Emma", "  Dune ", "The Hobbit"]  # "  Dune " normalises to "Dune": one behaviour
    table = tmp_path / "cache"
    matrix, info = build_behaviour_matrix(texts, table, model_dir, tokenizer, base, lower, 2, llm)
    assert matrix.shape == (5, base.config.hidden_size) and not matrix[0].any()  # row 0 = padding
    assert info["distinct_texts"] == 3 and info["encoded"] == 3 and np.array_equal(matrix[1], matrix[3])
    contract = json.loads((table / "contract.json").read_text())
    assert contract["lower_layers"] == 2 and contract["pooling"] == "mean, sink excluded" and len(contract["model_fingerprint"]) == 64

    again, info = build_behaviour_matrix(texts + ["Emma"], table, model_dir, tokenizer, base, lower, 2, llm)
    assert info["encoded"] == 0 and info["reused"] == 3 and np.array_equal(again[:5], matrix)
    _, info = build_behaviour_matrix(texts + ["Matilda"], table, model_dir, tokenizer, base, lower, 2, llm)
    assert info["encoded"] == 1 and info["reused"] == 3  # only the new behaviour is encoded

    lower1, _ = split_backbone(base, 1)
    with pytest.raises(FeatureContractError, match=r"model.llm.cache_dir: .*lower_layers 2 != expected 1"):
        build_behaviour_matrix(texts, table, model_dir, tokenizer, base, lower1, 1, LLMConfig(model=str(model_dir), lower_layers=1))
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    with open(other / "model.safetensors", "r+b") as f:  # other bytes, same sizes: a retrained model
        f.seek(-8, 2)
        f.write(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    with pytest.raises(FeatureContractError, match="model_fingerprint"):
        build_behaviour_matrix(texts, table, other, tokenizer, base, lower, 2, llm)


def test_bahe_trains_only_the_upper_layers_and_llm_ctr_runs_on_tokens(tiny, tmp_path):
    from recforge.align.ctr.data import CTRData, SampleArrays
    from recforge.records import Item

    model_dir, _, base = tiny
    n_items = 6
    items = {str(i): Item(str(i), {"title": t}) for i, t in enumerate(["Dune", "Emma", "Hamlet", "Ulysses", "Beloved", "Matilda"], 1)}
    hist = np.array([[0, 1, 2], [3, 4, 5], [0, 0, 6]])
    split = SampleArrays(np.array(["u1", "u2", "u3"], dtype=object), np.array([3, 6, 1]), hist, np.full_like(hist, 4),
                         np.array([1.0, 0.0, 1.0], np.float32))
    data = CTRData([str(i) for i in range(1, n_items + 1)], {"train": split, "valid": split, "test": split}, None)
    cfg = ModelConfig(backbone="bahe", embed_dim=8, history_length=3, mlp_hidden=[16, 8],
                      llm=LLMConfig(model=str(model_dir), lower_layers=2, lora_r=4))
    setup = prepare_llm(cfg.llm, data, items, tmp_path / "cache", need_tokens=True)
    lower_before = base.layers[0].mlp.up_proj.weight.clone()
    t, h, r, y = (torch.from_numpy(a) for a in (split.target, split.history, split.history_rating, split.label))
    for kind in ("bahe", "llm_ctr"):
        model = build_model(kind, setup, cfg, n_items, "mlp", fresh_base=True)
        opt = optimizer(model, TrainConfig(learning_rate=1e-2), 1e-2)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        assert lora and all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
        logits = model(t, h, r)
        assert logits.shape == (3,) and torch.isfinite(logits).all()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
        opt.step()
        assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)  # the adapters train
        if kind == "bahe":  # BAHE's tower holds the upper layers only; it never sees tokens
            assert len(model.tower.upper.base_model.model.layers) == 2 and model.tower.upper.base_model.model.embed_tokens is None
    assert torch.equal(base.layers[0].mlp.up_proj.weight, lower_before)  # the frozen base stays as it was


def test_bahe_recipe_runs_end_to_end_on_a_slice_of_goodbooks(tiny, tmp_path, repo_root, goodbooks_events, monkeypatch):
    from recforge.align.ctr import bahe
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import run_ctr
    from recforge.config import load_recipe

    model_dir, _, _ = tiny
    trained = []  # (kind, model, splits) of every BAHE / LLM-CTR training of the run: the real function, kept
    real_train = bahe.train_llm_ctr_model

    def keep_model(kind, setup, splits, *args, **kwargs):
        model, result = real_train(kind, setup, splits, *args, **kwargs)
        trained.append((kind, model, splits))
        return model, result

    monkeypatch.setattr(bahe, "train_llm_ctr_model", keep_model)
    events = goodbooks_events(4000)
    overrides = [f"out_dir={tmp_path / 'run'}", f"inputs.interactions.path={events}",
                 f"model.llm.model={model_dir}", f"model.llm.cache_dir={tmp_path / 'cache'}", "seeds=[0]",
                 "train.num_train_epochs=1", "train.max_train_samples=200", "train.max_eval_samples=100", "train.per_device_train_batch_size=64"]
    cfg = load_recipe(CTRRecipe, repo_root / "align/recipes/ctr_goodbooks_bahe.yaml", overrides)
    report = run_ctr(cfg)
    assert [r["variant"] for r in report["summary"]] == ["ids_only", "bahe"]
    assert report["data"]["samples"]["train"] == 200 and report["features"]["llm"]["lower_layers"] == 2
    assert report["features"]["behaviour_cache"]["encoded"] == 399  # every book of the catalogue, once
    assert all(np.isfinite(r["auc_mean"]) for r in report["summary"])
    assert (tmp_path / "run" / "report.md").read_text().count("| bahe |") == 1
    # the trained BAHE model's predictions come from the LLM behaviour vectors: zeroed, the test predictions move
    [(kind, model, splits)] = trained
    assert kind == "bahe" and model.vectors[1:].abs().sum() > 0
    probs = bahe.predict_llm(model, splits["test"], 64)
    model.vectors = torch.zeros_like(model.vectors)  # a new buffer: the shared behaviour matrix stays as it was
    without = bahe.predict_llm(model, splits["test"], 64)
    # a path that ignores the vectors repeats the same arithmetic: a difference of exactly 0 (measured: mean 0.01)
    assert len(probs) == 100 and np.abs(probs - without).mean() > 1e-3
    # the rerun reuses the table; another k is refused with the key to change
    assert run_ctr(cfg)["features"]["behaviour_cache"]["encoded"] == 0
    cfg.model.llm.lower_layers = 1
    with pytest.raises(FeatureContractError, match="lower_layers 2 != expected 1"):
        run_ctr(cfg)
