"""Every CTR variant trained: each (variant, adaptor) tuned with the same budget, then trained on every seed.

Finished trainings are cached under the run's `trainings/` folder, keyed by the samples, the dense inputs' content,
the setting and the seed, so a rerun (say, once generated knowledge exists) trains only what is new; the
logistic-regression floor is cached the same way (`cached_floor`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recforge.align.ctr.config import CTRRecipe
from recforge.align.ctr.dense_inputs import build_dense_inputs
from recforge.align.ctr.train import train_ctr_model
from recforge.io import atomic_write_json
from recforge.manifest import RunRecorder


def run_text_variants(cfg: CTRRecipe, data, items, profiles, run: RunRecorder, out: Path, log) -> tuple[list[dict], dict]:
    """The text / knowledge / judgement variants: dense inputs through the KAR (or MLP) adaptor, each variant tuned
    with the same budget (`tuning`), then trained on every seed."""
    dense, feature_report = build_dense_inputs(cfg, data, items, profiles, run, out)
    results, tuning = train_variants(cfg, data, dense, feature_report, log, out / "trainings")
    feature_report["tuning"] = tuning
    return results, feature_report


def train_variants(cfg: CTRRecipe, data, dense: dict, feature_report: dict, log, cache_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Every (variant, adaptor): `tuning.budget` settings (the same list for all) on the validation users, the best
    trained on every seed. Results carry `test_probs` (popped before the report is written) and their cost.

    `cache_dir`: finished trainings are kept there, keyed by the samples, the dense inputs' content, the setting and
    the seed, so a rerun (say, once generated knowledge exists) trains only what is new."""
    from recforge.align.ctr.tuning import candidates, tune_and_train
    from recforge.align.ctr.verdict import Stopwatch

    data_key = data_digest(data)

    def train_fn(model_cfg, train_cfg, seed, inputs, adaptor):
        key = training_key(data_key, [dense[i] for i in inputs], model_cfg, train_cfg, adaptor, seed)
        cached = cached_training(cache_dir, key)
        if cached is not None:  # the same data, inputs, setting and seed: the same training (cost as first measured)
            return cached
        with Stopwatch() as sw:
            _, result = train_ctr_model(data.splits, len(data.item_ids), [dense[i] for i in inputs], model_cfg, train_cfg,
                                        adaptor, seed, keep_probs=True)
        result.update(cpu_seconds=round(sw.cpu, 2), wall_seconds=round(sw.wall, 2))
        store_training(cache_dir, key, result)
        return result

    results = []
    tuning = {"budget": cfg.tuning.budget, "seed": cfg.tuning.seed, "space": cfg.tuning.space,
              "candidates": candidates(cfg.tuning, cfg.model, cfg.train), "variants": {}}
    for variant, inputs in cfg.variants.items():
        absent = [i for i in inputs if i not in dense]
        if absent:
            feature_report.setdefault("skipped_variants", {})[variant] = {i: feature_report["skipped_inputs"].get(i, "not built") for i in absent}
            print(f"[{cfg.name}] variant {variant} skipped: {feature_report['skipped_variants'][variant]}")
            continue
        for adaptor in ([None] if not inputs else cfg.adaptors):
            done = tune_and_train(lambda m, t, seed: train_fn(m, t, seed, inputs, adaptor), cfg.tuning, cfg.model,
                                  cfg.train, cfg.seeds)
            key = variant if adaptor is None or len(cfg.adaptors) == 1 else f"{variant}/{adaptor}"
            tuning["variants"][key] = {"trials": done["trials"], "chosen": done["chosen"]}
            for result in done["runs"]:
                result["variant"] = variant
                results.append(result)
                log(result)
            extra_seeds = [r for r in done["runs"] if not r.get("reused_from_tuning")]
            tuning["variants"][key]["train_cost"] = {
                "wall_seconds": round(sum(t["train_seconds"] for t in done["trials"]) + sum(r["train_seconds"] for r in extra_seeds), 2),
                "cpu_seconds": round(sum(t["cpu_seconds"] or 0 for t in done["trials"]) + sum(r["cpu_seconds"] for r in extra_seeds), 2),
                "trainings": len(done["trials"]) + len(extra_seeds)}
    return results, tuning


def data_digest(data) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("train", "valid", "test"):
        sp = data.splits[name]
        for arr in (sp.target, sp.history, sp.history_rating, sp.label):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\0".join(map(str, sp.user_ids)).encode())
    h.update(np.ascontiguousarray(data.held_out_items).tobytes())
    return h.hexdigest()


def training_key(data_key: str, dense: list, model_cfg, train_cfg, adaptor, seed: int) -> str:
    import hashlib

    h = hashlib.sha256(data_key.encode())
    for d in dense:
        h.update(d.name.encode() + np.ascontiguousarray(d.matrix, dtype=np.float32).tobytes())
    h.update(json.dumps([model_cfg.model_dump(mode="json"), train_cfg.model_dump(mode="json"), adaptor, seed],
                        sort_keys=True).encode())
    return h.hexdigest()[:32]


def cached_training(cache_dir: Path | None, key: str) -> dict | None:
    if cache_dir is None or not (cache_dir / f"{key}.json").is_file() or not (cache_dir / f"{key}.npy").is_file():
        return None
    result = json.loads((cache_dir / f"{key}.json").read_text(encoding="utf-8"))
    result["test_probs"] = np.load(cache_dir / f"{key}.npy")
    result["from_cache"] = True
    return result


def store_training(cache_dir: Path | None, key: str, result: dict) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{key}.tmp.npy"
    np.save(tmp, result["test_probs"])
    tmp.replace(cache_dir / f"{key}.npy")
    atomic_write_json(cache_dir / f"{key}.json", {k: v for k, v in result.items() if k != "test_probs"})


def cached_floor(cache_dir: Path | None, data_key: str, c_grid: list[float], fit) -> dict:
    """The logistic floor of these exact samples and C grid, fitted once (kept beside the cached trainings)."""
    import hashlib

    key = "floor-" + hashlib.sha256(json.dumps([data_key, c_grid]).encode()).hexdigest()[:32]
    cached = cached_training(cache_dir, key)
    if cached is not None:
        return cached
    floor = fit()
    store_training(cache_dir, key, floor)
    return floor
