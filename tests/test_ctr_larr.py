"""LARR: the InfoNCE alignment loss, the [AGG] aggregation encoder, scene texts and their cache, a recipe run."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recforge.align.ctr.config import LARRConfig, ModelConfig
from recforge.align.ctr.larr import SceneAggregator, SceneCTRModel, info_nce, scene_table, scene_texts


def test_info_nce_equals_a_hand_computed_value():
    scene = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    collab = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.5
    unit = lambda v: [x / math.hypot(*v) for x in v]  # noqa: E731
    s, c = [unit(v) for v in scene.tolist()], [unit(v) for v in collab.tolist()]
    loss = 0.0
    for i in range(3):  # -log softmax over the batch's collaborative vectors, own one in the numerator
        logits = [sum(a * b for a, b in zip(s[i], c[j])) / tau for j in range(3)]
        loss += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert info_nce(scene, collab, tau).item() == pytest.approx(loss / 3, abs=1e-6)
    assert info_nce(collab, collab, 0.05).item() < info_nce(scene, collab, 0.05).item()  # aligned pairs cost less


def test_aggregator_shapes_agg_token_and_masking():
    torch.manual_seed(0)
    cfg = LARRConfig(d_model=16, heads=2, layers=2, ff_dim=32, dropout=0.0)
    agg = SceneAggregator(in_dim=12, n_slots=5, out_dim=64, cfg=cfg).eval()
    feats = torch.randn(3, 5, 12)
    present = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    out = agg(feats, present)
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    changed = feats.clone()
    changed[1, 2:4] = 100.0  # absent features: masked out of the attention
    changed[0, 0] += 1.0  # a present one changes the [AGG] output
    again = agg(changed, present)
    assert torch.allclose(out[1], again[1], atol=1e-5) and (out[0] - again[0]).abs().max() > 1e-4
    model = SceneCTRModel(ModelConfig(embed_dim=32, larr=cfg), n_items=4, table=np.random.rand(7, 12).astype(np.float32),
                          n_slots=5, mode="larr")
    rows = torch.tensor([[1, 2, 3, 0, 4], [5, 6, 0, 0, 1]])
    logits, scene, collab = model(torch.tensor([1, 2]), torch.tensor([[0, 1], [3, 4]]), torch.tensor([[0, 4], [5, 3]]), rows)
    assert logits.shape == (2,) and scene.shape == collab.shape == (2, 64)  # the ID representation's size: 2 x embed_dim


def test_scene_texts_on_a_hand_made_movielens_user():
    from recforge.align.ctr.data import build_ctr_data
    from recforge.records import Item
    from recforge.splits import SplitRule

    # 2024-01-02 is a Tuesday; 14:00 UTC
    t0 = 1704204000
    rows = [("u1", f"m{k}", t0 + k, 5.0, k) for k in range(8)]
    events = pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Float64,
                                        "label": pl.Float64, "line": pl.Int64}, orient="row")
    items = [Item(f"m{k}", {"title": f"Movie {k}", "genres": ["Drama", "War"]}) for k in range(8)]
    data = build_ctr_data(events, items, positive_threshold=4, max_prompt_items=30, history_length=5,
                          rule=SplitRule.uniform(0), valid_percent=0)  # every user trains
    cfg = LARRConfig(profile_template="A {age}-year-old, zip {zip_prefix}", time_template="{weekday}, {hour}:00",
                     item_template="{title}. Genres: {genres}", recent_items=2)
    profiles = {"u1": {"age": 24, "zip_code": "43537"}}
    scene = scene_texts(data, {i.item_id: i for i in items}, profiles, cfg)
    assert scene.slots == ["profile", "time", "target", "recent_1", "recent_2"]
    first = [scene.texts[r - 1] for r in scene.rows["train"][0]]  # the sample at position 4: history m0..m3
    assert first == ["A 24-year-old, zip 435", "Tuesday, 14:00", "Movie 4. Genres: Drama, War",
                     "Movie 3. Genres: Drama, War", "Movie 2. Genres: Drama, War"]
    assert len(scene.texts) == len(set(scene.texts)) == 8 + 2  # items, one profile, one time text: deduplicated


def test_scene_table_is_cached_with_a_contract(tiny_model_dir, tmp_path):
    from recforge.align.ctr.features import FeatureContractError
    from recforge.align.ctr.larr import SceneTexts

    scene = SceneTexts(["target"], ["Dune", "Emma"], {})
    cfg = LARRConfig(encoder=str(tiny_model_dir))
    table, info = scene_table(scene, cfg, tmp_path / "scene")
    assert table.shape[0] == 3 and not table[0].any() and info["encoded"] == 2 and info["pooling"] == "mean"
    again, info = scene_table(scene, cfg, tmp_path / "scene")
    assert info["encoded"] == 0 and np.array_equal(table, again)
    with pytest.raises(FeatureContractError, match=r"model.larr.cache_dir: .*max_tokens 32 != expected 8"):
        scene_table(scene, LARRConfig(encoder=str(tiny_model_dir), max_tokens=8), tmp_path / "scene")


def test_larr_recipe_reports_the_four_variants(tiny_model_dir, tmp_path, repo_root, goodbooks_events, monkeypatch):
    from recforge.align.ctr import larr
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import run_ctr
    from recforge.config import load_recipe

    last_prediction = {}  # scene model -> (split, rows) of its last predict_scene call: the test split's
    real_predict = larr.predict_scene

    def remember(model, split, rows, *args, **kwargs):
        last_prediction[model] = (split, rows)
        return real_predict(model, split, rows, *args, **kwargs)

    monkeypatch.setattr(larr, "predict_scene", remember)

    events = goodbooks_events(2000)
    overrides = [f"out_dir={tmp_path / 'run'}", f"inputs.interactions.path={events}",
                 f"model.larr.encoder={tiny_model_dir}", f"model.larr.cache_dir={tmp_path / 'cache'}", "seeds=[0]",
                 "train.num_train_epochs=2", "train.per_device_train_batch_size=512", "model.larr.recent_items=3"]
    cfg = load_recipe(CTRRecipe, repo_root / "align/recipes/ctr_goodbooks_larr.yaml", overrides)
    report = run_ctr(cfg)
    assert [r["variant"] for r in report["summary"]] == ["ids_only", "scene_concat", "larr", "larr_no_align"]
    runs = {r["variant"]: r for r in report["runs"]}
    assert runs["larr"]["mean_train_losses"]["align"] > 0 and runs["larr_no_align"]["mean_train_losses"]["align"] == 0
    assert report["features"]["scene_table"]["slots"] == ["target", "recent_1", "recent_2", "recent_3"]
    assert all(np.isfinite(r["auc_mean"]) for r in report["summary"])
    # the trained scene models' predictions come from the LLM scene vectors: zeroed, the test predictions move
    assert sorted(m.mode for m in last_prediction) == ["concat", "larr", "larr"]
    for model, (split, rows) in last_prediction.items():
        assert model.table[1:].abs().sum() > 0
        probs = real_predict(model, split, rows)
        model.table = torch.zeros_like(model.table)  # a new buffer: the shared scene table stays as it was
        without = real_predict(model, split, rows)
        # a path that ignores the table repeats the same arithmetic: a difference of exactly 0. Measured: mean 0.03
        # (concat), 4.5e-4 (larr: two epochs barely move the aggregator's output); 1e-5 is ~100 float32 steps at p=0.5
        assert len(probs) == len(split) > 0 and np.abs(probs - without).mean() > 1e-5, model.mode
    cfg.model.larr.schedule = "before"
    cfg.model.larr.variants = ["larr"]
    before = run_ctr(cfg)["runs"][0]
    assert before["schedule"] == "before" and len(before["pre_align_losses"]) == 2
    assert before["pre_align_losses"][1] < before["pre_align_losses"][0]  # the aggregator learns the ID space
