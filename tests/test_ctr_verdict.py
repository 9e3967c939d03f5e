"""The CTR verdict (issue 24) and the CTR fixes of issue 23: new-item split, intervals, one tuning budget,
floors, seeds=[] as a one-line error, the folder digest as model identity, rejects per run, one KAR guard."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from recforge.align.ctr.data import build_ctr_data
from recforge.records import Item
from recforge.splits import EvalPercent, SplitRule, is_eval


def _events(n_users=60, n_items=40, per_user=30, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows, line = [], 0
    for u in range(n_users):
        for t, item in enumerate(rng.choice(n_items, size=per_user, replace=False)):
            rows.append((f"u{u}", f"i{item}", float(t), float(rng.integers(1, 6)), line))
            line += 1
    return pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Float64,
                                      "label": pl.Float64, "line": pl.Int64}, orient="row")


RULE = SplitRule(eval_percent=EvalPercent(user=20, item=25))


@pytest.mark.parametrize("history", ["keep", "remove"])
def test_item_split_never_trains_on_a_held_out_item(history):
    items = [Item(f"i{k}", {"title": f"Movie {k}"}) for k in range(40)]
    data = build_ctr_data(_events(), items, positive_threshold=4, max_prompt_items=30, history_length=10, rule=RULE,
                          valid_percent=20, new_items=True, new_item_history=history)
    held = {i + 1 for i, item in enumerate(data.item_ids) if is_eval("item", item, RULE)}
    assert set(data.held_out_items.tolist()) == held and held
    for name in ("train", "valid"):  # never a training or validation target
        assert not np.isin(data.splits[name].target, list(held)).any()
    in_fit_histories = np.isin(np.concatenate([data.splits[k].history.ravel() for k in ("train", "valid")]), list(held))
    if history == "remove":  # strict: gone from training histories too, and the histories stay left-padded
        assert not in_fit_histories.any()
        h = data.splits["train"].history
        assert ((h[:, 1:] > 0) | (h[:, :-1] == 0)).all()
        assert (data.splits["train"].history_rating[h == 0] == 0).all()
    else:  # a new item enters logs: it may still appear inside histories
        assert in_fit_histories.any()
    groups = data.test_groups()
    test = data.splits["test"]
    assert len(groups["new"]) and len(groups["warm"]) and len(groups["new"]) + len(groups["warm"]) == len(test)
    assert np.isin(test.target[groups["new"]], list(held)).all()
    assert data.stats["new_items"]["test_samples"] == {"warm": len(groups["warm"]), "new": len(groups["new"])}


def test_strict_history_is_the_last_events_without_held_out_items():
    # one user, 8 events by time; item "b" is forced held out by picking the rule from the data
    rule = RULE
    held_name = next(f"x{k}" for k in range(100) if is_eval("item", f"x{k}", rule))
    warm = [f"w{k}" for k in range(100) if not is_eval("item", f"w{k}", rule)][:7]
    seq = [warm[0], held_name, warm[1], warm[2], held_name, warm[3], warm[4], warm[5]]
    user = next(f"u{k}" for k in range(100) if not is_eval("user", f"u{k}", rule) and
                not (20 <= __import__("recforge.splits", fromlist=["bucket"]).bucket("user", f"u{k}", rule) < 40))
    ev = pl.DataFrame([(user, it, float(t), 5.0, t) for t, it in enumerate(seq)],
                      schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Float64, "label": pl.Float64,
                              "line": pl.Int64}, orient="row")
    items = [Item(i, {"title": i}) for i in set(seq)]
    data = build_ctr_data(ev, items, positive_threshold=4, max_prompt_items=30, history_length=3, rule=rule,
                          valid_percent=20, new_items=True, new_item_history="remove")
    idx = data.item_index
    train = data.splits["train"]
    # prefix = 4 events; samples are positions 4..7; position 4 is the held-out item: dropped as a target
    assert [data.item_ids[t - 1] for t in train.target] == [warm[3], warm[4], warm[5]]
    assert train.history[0].tolist() == [idx[warm[0]], idx[warm[1]], idx[warm[2]]]  # the held-out item skipped
    assert train.history[2].tolist() == [idx[warm[2]], idx[warm[3]], idx[warm[4]]]


def test_weighted_auc_matches_sklearn_and_a_hand_case():
    from sklearn.metrics import roc_auc_score

    from recforge.align.ctr.verdict import weighted_auc

    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    # by hand: positives 0.35 (beats 0.1, loses to 0.4) and 0.8 (beats both) -> 3 of 4 pairs
    assert weighted_auc(scores, labels, np.ones(4))[0] == pytest.approx(0.75)
    # weights 2,1,1,0: pairs (0.35 vs 0.1: 1*2 won, 0.35 vs 0.4: 1*1 lost), 0.8 has weight 0 -> 2 / (1 * 3)
    assert weighted_auc(scores, labels, np.array([2, 1, 1, 0]))[0] == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 300) / 4, rng.integers(0, 2, 300)  # many ties
    w = rng.integers(0, 3, (4, 300)).astype(float)
    for row, got in zip(w, weighted_auc(s, y, w)):
        assert got == pytest.approx(roc_auc_score(y, s, sample_weight=row))


def test_paired_delta_interval_on_a_hand_computed_case():
    from recforge.align.ctr.verdict import paired_delta

    labels = np.array([0, 1, 0, 1])
    base = [np.array([0.2, 0.1, 0.3, 0.4])]  # AUC: pos 0.1 beats none, pos 0.4 beats both -> 2/4 = 0.5
    variant = [np.array([0.1, 0.3, 0.2, 0.4])]  # pos 0.3 beats 0.1 and 0.2; 0.4 beats both -> 1.0
    weights = np.array([[1, 1, 1, 1],     # full set: 1.0 - 0.5 = +0.5
                        [1, 0, 1, 1],     # only pos 0.4: variant 1.0, base 1.0 -> 0
                        [1, 1, 0, 0],     # neg 0.2 vs pos 0.1: variant 1.0 (0.3 > 0.1), base 0 -> +1
                        [0, 1, 1, 0]], float)  # neg 0.3 / pos 0.1 (base 0); variant neg 0.2 / pos 0.3 (1) -> +1
    out = paired_delta(variant, base, labels, weights, level=0.5)
    assert out["delta"] == pytest.approx(0.5)
    # deltas {0.5, 0, 1, 1}: 25th / 75th percentiles (linear) of [0, 0.5, 1, 1] are 0.375 and 1.0
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.375), pytest.approx(1.0))
    assert out["excludes_zero"] and out["resamples"] == 4


def test_user_resamples_are_shared_and_weight_whole_users():
    from recforge.align.ctr.verdict import user_resample_weights

    users = np.array(["a", "a", "b", "c", "c", "c"], dtype=object)
    w = user_resample_weights(users, 50, seed=3)
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()  # a user's samples move together
    assert (w[:, [0, 2, 3]].sum(1) == 3).all()  # 3 users drawn per resample
    assert (user_resample_weights(users, 50, seed=3) == w).all()  # the same draws for every variant


def _synthetic(n_items=30, seed=0):
    from recforge.align.ctr.data import CTRData, SampleArrays

    rng = np.random.default_rng(seed)
    quality = rng.normal(size=n_items + 1)

    def split(n, users):
        target = rng.integers(1, n_items + 1, n)
        history = rng.integers(0, n_items + 1, (n, 5))
        label = (quality[target] + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
        return SampleArrays(np.array([f"{users}{i % 40}" for i in range(n)], dtype=object), target, history,
                            np.where(history > 0, 4, 0), label)

    data = CTRData([f"i{k}" for k in range(n_items)], {"train": split(1500, "t"), "valid": split(300, "v"),
                                                       "test": split(300, "x")}, pl.DataFrame())
    vec = np.vstack([np.zeros(4), np.c_[quality[1:], rng.normal(size=(n_items, 3))]]).astype(np.float32)
    return data, vec


def test_every_variant_gets_the_same_tuning_budget():
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.variants import train_variants
    from recforge.align.ctr.train import DenseInput

    data, vec = _synthetic()
    cfg = CTRRecipe.model_validate({
        "name": "t", "inputs": {"interactions": {"path": "x"}, "items": {"path": "y", "id": "item_id"}},
        "model": {"embed_dim": 8, "history_length": 5, "mlp_hidden": [16, 8], "adaptor_dim": 8, "expert_hidden": 16},
        "train": {"per_device_train_batch_size": 512, "num_train_epochs": 1, "early_stopping_patience": 1}, "seeds": [0, 1], "adaptors": ["kar"],
        "tuning": {"budget": 3, "seed": 5, "space": {"embed_dim": [4, 8], "dropout": [0.0, 0.3], "learning_rate": [1e-3, 3e-3]}},
        "variants": {"ids_only": [], "item_text": ["item_text"], "item_judgement": ["item_judgement"]}})
    dense = {"item_text": DenseInput("item_text", "item", vec), "item_judgement": DenseInput("item_judgement", "item", vec[:, :2])}
    results, tuning = train_variants(cfg, data, dense, {"skipped_inputs": {}}, lambda r: None)
    tried = {k: [t["setting"] for t in v["trials"]] for k, v in tuning["variants"].items()}
    assert set(tried) == {"ids_only", "item_text", "item_judgement"}
    assert all(t == tuning["candidates"] for t in tried.values()) and len(tuning["candidates"]) == 3
    assert tuning["candidates"][0] == {"embed_dim": 8, "dropout": 0.0, "weight_decay": 1e-5, "learning_rate": 1e-3}  # the recipe's
    assert len({json.dumps(c, sort_keys=True) for c in tuning["candidates"]}) == 3
    # every variant: budget trainings + one per extra seed (the tuning seed's run is not reused: seed 5 not in seeds)
    assert {v["train_cost"]["trainings"] for v in tuning["variants"].values()} == {3 + 2}
    assert sorted((r["variant"], r["seed"]) for r in results) == sorted(
        (v, s) for v in ("ids_only", "item_text", "item_judgement") for s in (0, 1))
    assert all(len(r["test_probs"]) == 300 for r in results)


def test_floors_use_the_din_inputs_and_popularity():
    from recforge.align.ctr.verdict import logistic_features, logistic_floor, popularity_floor

    data, _ = _synthetic()
    x = logistic_features(data.splits["test"], 30)
    assert x.shape == (300, 31 + 31 + 11)
    assert np.allclose(x[:, 62:].sum(1), 1.0)  # the rating histogram of a non-empty history sums to 1
    lr = logistic_floor(data.splits, 30, [0.1, 1.0])
    assert lr["chosen"]["C"] in (0.1, 1.0) and len(lr["trials"]) == 2 and len(lr["test_probs"]) == 300
    pop = popularity_floor(data.splits, 30)
    assert pop["test_probs"][0] == (data.splits["train"].target == data.splits["test"].target[0]).sum()


def _tiny_recipe(tmp_path, extra: list[str]) -> list[str]:
    events = tmp_path / "events.jsonl"
    rng = np.random.default_rng(0)
    lines = [json.dumps({"user_id": f"u{u}", "item_id": f"i{rng.integers(0, 15)}", "timestamp": t, "rating": int(rng.integers(1, 6))})
             for u in range(40) for t in range(12)]
    events.write_text("\n".join(lines + ["{not json"]) + "\n", encoding="utf-8")
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"item_id": f"i{k}", "title": f"Movie {k}"}) for k in range(15)) + "\n")
    recipe = tmp_path / "ctr.yaml"
    recipe.write_text(
        "name: tiny\n"
        f"out_dir: {tmp_path / 'out'}\n"
        "inputs:\n"
        f"  interactions: {{path: {events}, fields: {{user_id: user_id, item_id: item_id, timestamp: timestamp, label: rating}}}}\n"
        f"  items: {{path: {items}, id: item_id, fields: {{title: title}}}}\n"
        "split: {eval_percent: {user: 30, item: 30}}\nvalid_percent: 30\n"
        "new_items: {enabled: true}\n"
        "model: {embed_dim: 4, history_length: 4, mlp_hidden: [8, 4]}\n"
        "train: {per_device_train_batch_size: 256, num_train_epochs: 1, early_stopping_patience: 1}\n"
        "bootstrap: {resamples: 20}\n"
        "variants: {ids_only: []}\nseeds: [0]\n", encoding="utf-8")
    return [str(recipe), *extra]


def test_empty_seeds_is_a_one_line_error(tmp_path):
    args = _tiny_recipe(tmp_path, ["seeds=[]"])
    proc = subprocess.run([sys.executable, "-m", "recforge", "eval", "ctr", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "seeds" in proc.stderr


@pytest.mark.parametrize("overrides, named", [
    (["model.backbone=bahe", "variants={text: [item_text]}"], "variants"),  # BAHE trains its own variants
    (["model.backbone=bahe", "adaptors=[mlp, kar]"], "adaptors after the first"),
    (["model.backbone=bahe", "model.scene=larr"], "model.scene: larr"),
    (["model.scene=larr", "tuning.budget=3"], "tuning"),  # LARR has no tuning budget
    (["model.llm.lower_layers=4"], "model.llm"),  # a DIN recipe never builds the LLM tower
])
def test_a_key_the_mode_ignores_is_refused_by_name(tmp_path, overrides, named):
    args = _tiny_recipe(tmp_path, overrides)
    proc = subprocess.run([sys.executable, "-m", "recforge", "train-ctr", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "does not read" in proc.stderr and named in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_rerun_resets_rejects_and_writes_the_verdict(tmp_path):
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import run_ctr
    from recforge.config import load_recipe

    args = _tiny_recipe(tmp_path, [])
    cfg = load_recipe(CTRRecipe, args[0], [])
    for _ in range(2):
        report = run_ctr(cfg)
    out = tmp_path / "out"
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 1  # the one bad row, not one per run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"]["total"] == 1
    verdict = json.loads((out / "verdict.json").read_text())
    names = [r["variant"] for r in verdict["rows"]]
    assert names == ["logistic_regression", "item_popularity", "ids_only"]
    assert set(verdict["groups"]) == {"warm", "new"} and (out / "verdict.md").is_file() and (out / "verdict.png").is_file()
    assert report["verdict"]["tuning"]["trials_per_variant"] == {"ids_only": 1}


def test_feature_cache_identifies_a_model_by_its_whole_folder(tmp_path):
    from recforge.align.ctr.features import model_revision

    a, b = tmp_path / "a", tmp_path / "b"
    for d, second in ((a, b"shard two, first model"), (b, b"shard two, second model")):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"the same first shard")
        (d / "model-00002-of-00002.safetensors").write_bytes(second)
        (d / "config.json").write_text("{}")
    assert model_revision(str(a)) != model_revision(str(b))  # the first shard alone could not tell them apart
    from recforge.fingerprint import folder_digest

    assert model_revision(str(a)) == "folder-sha256:" + folder_digest(a)


def test_kar_guard_is_one_setting_shared_with_generate():
    from recforge.align.ctr.config import GuardConfig
    from recforge.align.ctr.data import apply_leakage_guard
    from recforge.config import RecforgeError
    from recforge.generate.inputs import kar_prefix_length as generate_prefix
    from recforge.splits import KAR_MAX_PROMPT_ITEMS, kar_prefix_length

    assert GuardConfig().max_prompt_items == KAR_MAX_PROMPT_ITEMS
    with pytest.raises((ValueError, RecforgeError)):
        GuardConfig(max_prompt_items=KAR_MAX_PROMPT_ITEMS + 5)
    counts = [1, 2, 7, 59, 60, 61, 200]
    ev = pl.DataFrame([(f"u{n}", f"i{k}", float(k), 4.0, k) for n in counts for k in range(n)],
                      schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Float64, "label": pl.Float64,
                              "line": pl.Int64}, orient="row")
    prompt = apply_leakage_guard(ev).group_by("user_id").agg(pl.col("is_prompt").sum())
    got = {r["user_id"]: r["is_prompt"] for r in prompt.to_dicts()}
    assert got == {f"u{n}": kar_prefix_length(n) for n in counts} == {f"u{n}": generate_prefix(n) for n in counts}
