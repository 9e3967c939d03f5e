"""LARR's AUC table: IDs-only, the scene vectors concatenated, LARR aggregation, LARR without alignment (3 seeds).

Runs align/recipes/ctr_ml100k_larr.yaml (MovieLens-100K from ../shared/data/movielens_100k, path overridable,
skipped when absent; never committed) and ctr_goodbooks_larr.yaml, and copies each report to
bench/results/ctr_larr_<dataset>.{json,md,png} with the load average and torch's thread count.

    .venv/bin/python bench/ctr_larr.py                 # SmolLM2-135M scene encoder, the recipes' 3 seeds
    .venv/bin/python bench/ctr_larr.py --quick         # smoke run: tiny model, 1 seed, 2 epochs of 5k samples (-> runs/bench/results)
    .venv/bin/python bench/ctr_larr.py --set model.larr.schedule=before --tag before   # -> ctr_larr_<dataset>_before.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
from results_dir import results_dir  # noqa: E402
RECIPES = {"movielens": REPO / "align/recipes/ctr_ml100k_larr.yaml", "goodbooks": REPO / "align/recipes/ctr_goodbooks_larr.yaml"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", nargs="+", default=["movielens", "goodbooks"], choices=list(RECIPES))
    p.add_argument("--movielens", default=str(REPO.parent / "shared/data/movielens_100k"))
    p.add_argument("--encoder", default=None, help="scene encoder (default: the recipe's, smollm2; tiny with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more recipe overrides")
    p.add_argument("--tag", default="", help="suffix of the result files, so a variant run keeps the main table")
    args = p.parse_args()

    import torch

    from recforge.align.ctr.config import CTRRecipe
    from recforge.align.ctr.run import run_ctr
    from recforge.config import load_recipe

    torch.set_num_threads(args.threads)
    encoder = args.encoder or (_tiny() if args.quick else None)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    for dataset in args.datasets:
        out_dir = REPO / "runs" / "bench" / f"ctr_larr{suffix}" / dataset
        overrides = [f"out_dir={out_dir}", f"train.num_threads={args.threads}"]
        if dataset == "movielens":
            root = Path(args.movielens)
            overrides += [f"inputs.{name}.path={root / f'{name}.jsonl.gz'}" for name in ("interactions", "items", "users")]
        if encoder:
            overrides += [f"model.larr.encoder={encoder}", f"model.larr.cache_dir={out_dir / ('scene_cache_' + Path(encoder).name)}"]
        if args.quick:
            overrides += ["seeds=[0]", "train.num_train_epochs=2", "train.per_device_train_batch_size=256", "train.max_train_samples=5000",
                          "train.max_eval_samples=2000"]
        cfg = load_recipe(CTRRecipe, RECIPES[dataset], overrides + list(args.set))
        load_before, started = os.getloadavg(), time.time()
        report = run_ctr(cfg)
        if report["status"] != "done":
            continue
        report["bench"] = {"load_average_before": load_before, "load_average_after": os.getloadavg(),
                           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                           "wall_seconds": round(time.time() - started, 1), "quick": args.quick, "overrides": overrides + list(args.set)}
        # a smoke run is not a measurement; MovieLens results stay under runs/ (never committed)
        results = REPO / "runs" / "bench" / "results" if args.quick else results_dir(dataset)
        stem = results / f"ctr_larr_{dataset}{suffix}"
        results.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        shutil.copyfile(out_dir / "report.md", stem.with_suffix(".md"))
        shutil.copyfile(out_dir / "auc.png", results / f"{stem.name}_auc.png")
        print(f"wrote {stem}.json / .md / _auc.png")
    return 0


def _tiny() -> str:
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    out = REPO / "runs" / "tiny-model"
    if not (out / "config.json").is_file():
        build_tiny_model(TinyModelConfig(), out)
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
