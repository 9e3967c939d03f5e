"""One fixed tuning budget for every CTR variant (issue 24), so no variant wins by being tuned more.

`candidates(recipe)` is the list of settings every variant tries: the recipe's own setting first, then
`tuning.budget - 1` settings drawn without replacement from the grid `tuning.space` by `tuning.seed`. It depends
on the recipe only, never on the variant; each setting is trained once (seed `tuning.seed`, early stopping on
validation AUC) and the one with the best validation AUC is trained on every seed.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from recforge.align.ctr.config import ModelConfig, TrainConfig, TuningConfig

KEYS = ("embed_dim", "dropout", "weight_decay", "learning_rate")


def base_setting(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"embed_dim": model_cfg.embed_dim, "dropout": model_cfg.dropout,
            "weight_decay": train_cfg.weight_decay, "learning_rate": train_cfg.learning_rate}


def candidates(tuning: TuningConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[dict[str, Any]]:
    """The settings every variant tries, in order (the recipe's own setting first)."""
    base = base_setting(model_cfg, train_cfg)
    grid = [dict(zip(KEYS, values)) for values in itertools.product(*(tuning.space.get(k, [base[k]]) for k in KEYS))]
    for g in grid:
        g["embed_dim"] = int(g["embed_dim"])
    random.Random(tuning.seed).shuffle(grid)
    out = [base] + [g for g in grid if g != base]
    return out[: tuning.budget]


def apply(setting: dict[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The configs of one setting."""
    return (model_cfg.model_copy(update={"embed_dim": int(setting["embed_dim"]), "dropout": float(setting["dropout"])}),
            train_cfg.model_copy(update={"weight_decay": float(setting["weight_decay"]), "learning_rate": float(setting["learning_rate"])}))


def tune_and_train(train_fn, tuning: TuningConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   seeds: list[int]) -> dict[str, Any]:
    """Try every candidate (seed `tuning.seed`), keep the best by validation AUC, train it on every seed.

    `train_fn(model_cfg, train_cfg, seed) -> result` (with `valid_auc`, `train_seconds`). A seed equal to the
    tuning seed reuses the tuning run of the chosen setting (same setting, same seed: the same training).
    Returns {"trials": [...], "chosen": setting, "runs": [result per seed]}.
    """
    trials, best = [], None
    for setting in candidates(tuning, model_cfg, train_cfg):
        result = train_fn(*apply(setting, model_cfg, train_cfg), tuning.seed)
        print(f"[tuning] {setting}: valid AUC {result['valid_auc']:.4f} (best epoch {result['best_epoch']}, "
              f"{result['train_seconds']:.0f} s{', cached' if result.get('from_cache') else ''})", flush=True)
        trials.append({"setting": setting, "valid_auc": result["valid_auc"], "best_epoch": result["best_epoch"],
                       "train_seconds": result["train_seconds"], "cpu_seconds": result.get("cpu_seconds")})
        if best is None or result["valid_auc"] > best[1]["valid_auc"]:
            best = (setting, result)
    chosen, chosen_run = best
    runs = []
    for seed in seeds:
        if seed == tuning.seed:
            runs.append({**chosen_run, "reused_from_tuning": True})
        else:
            runs.append(train_fn(*apply(chosen, model_cfg, train_cfg), seed))
    return {"trials": trials, "chosen": chosen, "runs": runs}
