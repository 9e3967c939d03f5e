"""CTR bridge: the trainer uses dense features, KAR's leakage guard, and feature-table contracts."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recforge.align.ctr.config import ModelConfig, TrainConfig
from recforge.align.ctr.data import SampleArrays, apply_leakage_guard, build_ctr_data, user_history_texts
from recforge.align.ctr.train import DenseInput, train_ctr
from recforge.align.ctr.features import (
    FeatureContractError,
    FeatureExpectation,
    align_to_ids,
    load_feature_table,
    write_feature_table,
)
from recforge.records import Item
from recforge.splits import SplitRule


def synthetic_splits(n_items=200, n_users=1000, per_user=10, dim=16, seed=0):
    """Labels depend only on a hidden per-item score that dimension 0 of the item's dense vector reveals."""
    rng = np.random.default_rng(seed)
    item_vec = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    item_vec[0] = 0
    users = np.repeat(np.arange(n_users), per_user).astype(str).astype(object)
    target = rng.integers(1, n_items + 1, size=len(users))
    history = rng.integers(1, n_items + 1, size=(len(users), 8))
    label = (item_vec[target, 0] > 0).astype(np.float32)
    arrays = SampleArrays(users, target, history, np.full_like(history, 4), label)
    u = np.array([int(x) % 10 for x in users])  # a stable split (str hash() changes per process)
    splits = {"train": arrays.take(np.flatnonzero(u >= 2)), "valid": arrays.take(np.flatnonzero(u == 1)),
              "test": arrays.take(np.flatnonzero(u == 0))}
    return splits, n_items, DenseInput("item_text", "item", item_vec)


@pytest.mark.parametrize("backbone,adaptor", [("din", "kar"), ("dcn", "mlp")])
def test_trainer_learns_the_signal_a_dense_feature_carries(backbone, adaptor):
    splits, n_items, dense = synthetic_splits()
    # Every item occurs in training, so its ID embedding could memorise the label: hold items out of
    # training instead, so only the dense vector can carry the signal to unseen test items.
    test_items = set(range(1, n_items + 1, 4))
    for name in ("valid", "test"):
        keep = np.isin(splits[name].target, list(test_items))
        splits[name] = splits[name].take(np.flatnonzero(keep))
    splits["train"] = splits["train"].take(np.flatnonzero(~np.isin(splits["train"].target, list(test_items))))
    cfg = ModelConfig(backbone=backbone, embed_dim=16, history_length=8, mlp_hidden=[64, 32])
    train = TrainConfig(per_device_train_batch_size=512, learning_rate=3e-3, num_train_epochs=5, early_stopping_patience=2)
    with_dense = train_ctr(splits, n_items, [dense], cfg, train, adaptor, seed=0)
    ids_only = train_ctr(splits, n_items, [], cfg, train, None, seed=0)
    assert with_dense["test_auc"] > 0.9
    # unseen items' ID embeddings are untrained: chance level give or take the ~50 test items' luck (0.40-0.67
    # over data seeds 0-3), far below the dense model. Log loss is not compared: training early-stops on
    # validation AUC, and a confident model's log loss on unseen items varies with a few mistakes.
    assert with_dense["test_auc"] > ids_only["test_auc"] + 0.25


def test_leakage_guard_on_a_hand_made_user():
    # user u1 has 7 events (out of time order in the file), u2 has 1, u3 has 80
    rows = [("u1", f"i{t}", t, 5.0 if t % 2 else 2.0, line) for line, t in enumerate([3, 1, 2, 7, 5, 6, 4])]
    rows += [("u2", "i1", 1, 5.0, 100)]
    rows += [("u3", f"i{t % 9}", t, 4.0, 200 + t) for t in range(80)]
    events = pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Float64,
                                        "label": pl.Float64, "line": pl.Int64}, orient="row")
    guarded = apply_leakage_guard(events, max_prompt_items=30)
    u1 = guarded.filter(pl.col("user_id") == "u1")
    # n=7 -> the first (7+1)//2 = 4 events by time are prompt-only
    assert u1.filter(pl.col("is_prompt"))["timestamp"].to_list() == [1, 2, 3, 4]
    assert guarded.filter(pl.col("user_id") == "u2")["is_prompt"].to_list() == [True]  # a single event is never a sample
    assert guarded.filter(pl.col("user_id") == "u3")["is_prompt"].sum() == 30  # capped at 30

    items = [Item(f"i{k}", {"title": f"Book {k}"}) for k in range(10)]
    data = build_ctr_data(events, items, positive_threshold=4, max_prompt_items=30, history_length=5,
                          rule=SplitRule.uniform(0), valid_percent=0)  # every user trains
    train = data.splits["train"]
    u1_rows = np.flatnonzero(train.user_ids == "u1")
    index = data.item_index
    # u1's samples are its events at times 5, 6, 7 with labels from rating >= 4
    assert [data.item_ids[t - 1] for t in train.target[u1_rows]] == ["i5", "i6", "i7"]
    assert train.label[u1_rows].tolist() == [1.0, 0.0, 1.0]
    # the history of the time-5 sample is the 4 earlier events, most recent last, left-padded
    assert train.history[u1_rows[0]].tolist() == [0, index["i1"], index["i2"], index["i3"], index["i4"]]
    # text features are built from the prompt-only prefix: never from a sample's event
    texts = user_history_texts(data.prompt_events, {i.item_id: i for i in items}, user_template="{history}",
                               history_item_template="{title} ({rating:.0f} stars)", max_history_items=30)
    assert texts["u1"] == "Book 1 (5 stars); Book 2 (2 stars); Book 3 (5 stars); Book 4 (2 stars)"


def write_table(tmp_path, name="items", dim=4, vectors=None, normalized=True):
    ids = ["a", "b", "c"]
    vectors = np.eye(3, dim, dtype=np.float32) if vectors is None else vectors
    write_feature_table(tmp_path / name, name=name, entity="item", ids=ids, vectors=vectors, model="enc-v1",
                        normalized=normalized, source_hashes={"catalogue": "abc"})
    return tmp_path / name


def test_contract_loader_rejects_each_kind_of_mismatch(tmp_path):
    table = write_table(tmp_path)
    ids, vecs, contract = load_feature_table(table, FeatureExpectation(dimension=4, model="enc-v1", normalized=True))
    assert ids == ["a", "b", "c"] and vecs.shape == (3, 4) and contract["version"].startswith("items@")
    for expect, message in [
        (FeatureExpectation(dimension=8), "dimension 4 != expected 8"),
        (FeatureExpectation(model="enc-v2"), "model 'enc-v1' != expected 'enc-v2'"),
        (FeatureExpectation(normalized=False), "normalized=True but the job expects normalized=False"),
        (FeatureExpectation(entity="user"), "entity 'item' != expected 'user'"),
    ]:
        with pytest.raises(FeatureContractError, match=message):
            load_feature_table(table, expect)
    with pytest.raises(FeatureContractError, match="not a recforge feature table"):
        load_feature_table(tmp_path)

    bad = np.eye(3, 4, dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(FeatureContractError, match="NaN or inf, e.g. id b"):
        write_table(tmp_path, name="nan", vectors=bad)


def test_a_table_edited_to_a_wrong_dimension_or_nan_is_named_on_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = write_table(tmp_path)
    pq.write_table(pa.table({"item_id": ["a", "b"], "vector": [[1.0, 0, 0, 0], [1.0, 0, 0]]}), table / "vectors.parquet")
    with pytest.raises(FeatureContractError, match="not of the contract's dimension 4, e.g. id b"):
        load_feature_table(table)
    pq.write_table(pa.table({"item_id": ["a", "b"], "vector": [[1.0, 0, 0, 0], [float("inf"), 0, 0, 0]]}),
                   table / "vectors.parquet")
    with pytest.raises(FeatureContractError, match="NaN or inf, e.g. id b"):
        load_feature_table(table)


def test_id_coverage_is_counted_not_a_crash(tmp_path):
    ids, vecs, _ = load_feature_table(write_table(tmp_path))
    matrix, coverage = align_to_ids("items", ids, vecs, needed=["c", "zz", "a"])
    assert matrix.tolist()[1] == [0, 0, 0, 0] and matrix[0].tolist() == vecs[2].tolist()
    assert coverage.to_dict() | {} == {"table": "items", "needed": 3, "found": 2, "missing": 1,
                                      "missing_examples": ["zz"], "unused": 1}


def test_a_text_vector_cache_is_reused_only_for_the_same_model_and_texts(tmp_path, monkeypatch):
    """`cached_text_vectors` (BAHE's and LARR's cache) checks its recorded `recforge.run_contract` contract: the same
    model (by content, wherever its folder is) and settings reuse every vector; an edited text is encoded, never
    answered with the old text's vector; a retrained model or another setting is refused, naming what differs."""
    import json
    import shutil

    from recforge import run_contract
    from recforge.align.ctr.features import cached_text_vectors, text_key

    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "digests"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights one")
    (model / "config.json").write_text("{}")
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return np.asarray([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], np.float32)

    def cache(texts, model_dir=model, pooling="mean"):
        index, vectors, info = cached_text_vectors(tmp_path / "cache", name="scene", entity="scene_text", texts=texts,
                                                   contract={"pooling": pooling}, model=str(model_dir), dimension=3,
                                                   encode=encode, config_key="model.larr.cache_dir")
        return {t: vectors[index[text_key(t)]].tolist() for t in texts}, info

    first, info = cache(["Dune", "Emma"])
    assert info["encoded"] == 2 and calls == [["Dune", "Emma"]]
    recorded = json.loads((tmp_path / "cache" / "contract.json").read_text())
    assert recorded["run_contract"]["job"] == "scene" and recorded["run_contract"]["inputs"] == {}
    assert recorded["run_contract"]["model"] == {"digest": run_contract.model_digest(model)}
    assert recorded["dimension"] == 3 and recorded["normalized"] is False and recorded["pooling"] == "mean"

    copied = tmp_path / "copied"
    shutil.copytree(model, copied)
    again, info = cache(["Dune", "Emma"], model_dir=copied)  # the same bytes elsewhere: reused
    assert info["encoded"] == 0 and again == first and len(calls) == 1

    edited, info = cache(["Dune", "Emma!"])  # an edited text: encoded, not the old text's vector
    assert info["encoded"] == 1 and calls[-1] == ["Emma!"] and edited["Emma!"] == encode(["Emma!"])[0].tolist()

    (copied / "model.safetensors").write_bytes(b"weights two")  # retrained, same size
    with pytest.raises(FeatureContractError, match=r"model.larr.cache_dir: .*model.digest '[0-9a-f]{64}' != expected"):
        cache(["Dune"], model_dir=copied)
    with pytest.raises(FeatureContractError, match=r"model.larr.cache_dir: .*pooling 'mean' != expected 'last'"):
        cache(["Dune"], pooling="last")

    # a cache written before contract.json recorded its run contract: checked from its flat fields
    legacy = json.loads((tmp_path / "cache" / "contract.json").read_text())
    del legacy["run_contract"]
    (tmp_path / "cache" / "contract.json").write_text(json.dumps(legacy))
    assert cache(["Dune"])[1]["encoded"] == 0
    with pytest.raises(FeatureContractError, match="model.digest"):
        cache(["Dune"], model_dir=copied)


def test_eval_ctr_end_to_end_on_a_slice_of_the_shipped_ratings(tmp_path, repo_root):
    """Recipe -> feature tables with contracts -> variants -> report files, on the first 6k goodbooks events."""
    import gzip
    import json
    import subprocess
    import sys

    from recforge.io import resolve_path

    src = resolve_path("sample://goodbooks_10k_ratings_subset/interactions.jsonl.gz")
    with gzip.open(src, "rt") as f, open(tmp_path / "events.jsonl", "w") as out:
        for _, line in zip(range(6000), f):
            out.write(line)
        out.write('{"user_id": 5, "book_id": 87, "seq_pos": "late", "rating": 4}\n')  # bad row: quarantined
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "recforge", "eval", "ctr", str(repo_root / "align/recipes/ctr_goodbooks.yaml"),
           f"out_dir={out_dir}", f"inputs.interactions.path={tmp_path / 'events.jsonl'}",
           f"inputs.knowledge={tmp_path / 'no-knowledge'}", "seeds=[0,1]", "train.num_train_epochs=2",
           "variants={ids_only: [], item_text: [item_text], knowledge: [item_knowledge]}", "adaptors=[kar]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out_dir / "report.json").read_text())
    assert [(r["variant"], r["adaptor"], r["seeds"]) for r in report["summary"]] == [("ids_only", "-", 2), ("item_text", "kar", 2)]
    assert "generate stage" in report["features"]["skipped_variants"]["knowledge"]["item_knowledge"]
    assert report["features"]["coverage"]["item_text"]["missing"] == 0
    assert all(0.5 < r["auc_mean"] < 1 for r in report["summary"])
    assert "ΔAUC vs IDs-only" in (out_dir / "report.md").read_text() and (out_dir / "auc.png").stat().st_size > 5000
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["rejects"]["by_reason"] == {"wrong_type": 1}
    # the user split is the project rule's, recorded in the manifest and named in the report
    assert manifest["split_rule"] == {"source": "recipe", **SplitRule().model_dump()}
    assert report["data"]["user_split"]["test"] == "sha256('' + 'user:<id>') % 100 < 10"
    _, vecs, contract = load_feature_table(out_dir / "features" / "item_text", FeatureExpectation(dimension=384, normalized=True))
    assert contract["rows"] == 399 and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)


def test_ctr_test_users_are_the_shared_rules_held_out_users(repo_root):
    """The CTR bridge's test users are `is_eval("user", id)` of the `split:` rule every stage shares (the users
    data_recipes holds out); validation is the next `valid_percent` buckets; a recipe override moves both."""
    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import ctr_data, read_inputs
    from recforge.config import RecforgeError, load_recipe
    from recforge.splits import bucket, is_eval

    recipe = repo_root / "align/recipes/ctr_goodbooks.yaml"
    cfg = load_recipe(CTRRecipe, recipe)
    events, items, _ = read_inputs(cfg, None)
    users_of = lambda data, name: set(data.splits[name].user_ids.tolist())  # noqa: E731
    data = ctr_data(cfg, events, items)
    users = set().union(*(users_of(data, s) for s in ("train", "valid", "test")))
    assert len(users) > 100
    assert users_of(data, "test") == {u for u in users if is_eval("user", u)}  # the default rule: 10 %
    assert users_of(data, "valid") == {u for u in users if 10 <= bucket("user", u) < 20}

    wide = load_recipe(CTRRecipe, recipe, ["split.eval_percent.user=30"])
    moved = ctr_data(wide, events, items)
    assert users_of(moved, "test") == {u for u in users if is_eval("user", u, wide.split)}
    assert users_of(moved, "test") > users_of(data, "test")  # 30 % of the users now, the 10 % among them
    assert users_of(moved, "valid") == {u for u in users if 30 <= bucket("user", u) < 40}
    assert moved.stats["user_split"]["test"] == "sha256('' + 'user:<id>') % 100 < 30"
    with pytest.raises(RecforgeError, match="over 100"):
        load_recipe(CTRRecipe, recipe, ["split.eval_percent.user=95"])


def test_movielens_recipe_skips_cleanly_where_the_data_is_absent(tmp_path, repo_root):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "recforge", "eval", "ctr", str(repo_root / "align/recipes/ctr_ml100k.yaml"),
                           f"out_dir={tmp_path}", f"inputs.interactions.path={tmp_path}/absent/interactions.jsonl.gz"],
                          capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0 and "skipped: input files absent" in proc.stdout
    assert not (tmp_path / "report.json").exists()


def test_export_features_writes_a_table_a_job_can_check(tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    from recforge.align.ctr.config import ExportFeaturesRecipe
    from recforge.align.ctr.run import run_export_features

    catalogue = tmp_path / "books.csv"
    catalogue.write_text("book_id,title,authors\n1,Dune,Frank Herbert\n2,Emma,Jane Austen\n3,,\n", encoding="utf-8")
    cfg = ExportFeaturesRecipe(name="books", out_dir=str(tmp_path / "table"), text_template="{title} by {authors}",
                               source={"path": str(catalogue), "id": "book_id", "fields": {"title": "title", "authors": "authors"}})
    contract = run_export_features(cfg)
    from recforge.fingerprint import folder_digest

    # the model is identified by the project's one content digest of its folder (every file, not one shard)
    assert contract["rows"] == 2 and contract["dimension"] == 384
    assert contract["model"]["revision"] == "folder-sha256:" + folder_digest(minilm_dir)
    ids, vecs, _ = load_feature_table(tmp_path / "table", FeatureExpectation(dimension=384, model=str(minilm_dir),
                                                                            normalized=True, entity="item"))
    direct = SentenceTransformer(str(minilm_dir), device="cpu").encode(["Dune by Frank Herbert", "Emma by Jane Austen"],
                                                                       normalize_embeddings=True)
    assert ids == ["1", "2"] and np.allclose(vecs, direct, atol=1e-5)
    rejects = (tmp_path / "table" / "rejects.jsonl").read_text()
    assert '"line": 4' in rejects and "empty_text" in rejects  # the empty row is quarantined, not dropped silently
    # a rerun over the same texts and model reuses the table instead of re-encoding it
    assert run_export_features(cfg)["version"] == contract["version"]
    cfg.text_template = "{title}"
    assert run_export_features(cfg)["version"] != contract["version"]
