"""Retrieval lift over seeds: the shipped recipes (MiniLM encoder, tiny causal LM) aligned on the ESCI sample,
base vs tuned NDCG@10 / Recall@10 / MRR@10 on held-out queries, mean and spread over seeds.

    .venv/bin/python bench/align_quality.py [--seeds 0 1 2] [--which minilm tiny_lm]
    .venv/bin/python bench/align_quality.py --which larr_goodbooks --out bench/results/align_quality_larr.json \
        data.pairs_path=runs/data/goodbooks/pairs        # after `make data`

Writes bench/results/align_quality.json (per-seed metrics, mean, std, min of the NDCG@10 lift).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

RECIPES = {"minilm": "align/recipes/esci_minilm.yaml", "tiny_lm": "align/recipes/esci_tiny_lm.yaml",
           # LARR multi-type + 360 user <-> tag on data_recipes' goodbooks pairs: pass data.pairs_path=<run>/pairs
           "larr_goodbooks": "align/recipes/goodbooks_larr.yaml"}
METRICS = ("ndcg@10", "recall@10", "mrr@10")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--which", nargs="+", default=["minilm", "tiny_lm"], choices=list(RECIPES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "align_quality.json"))
    ap.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    args = ap.parse_args()

    from recforge.align.align_config import AlignConfig
    from recforge.align.trainer import run_align
    from recforge.config import load_recipe
    from recforge.io import atomic_write_json

    repo = Path(__file__).resolve().parents[1]
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {"benchmark": "align_quality", "recipes": {}}
    for name in args.which:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                cfg = load_recipe(AlignConfig, repo / RECIPES[name],
                                  [f"seed={seed}", f"out_dir={tmp}/{name}-{seed}",
                                   *args.overrides])
                out = run_align(cfg)
                # plus the per-kind NDCG@10 of multi-type pair files (user_tag:ndcg@10, item_tag:ndcg@10, ...)
                metrics = METRICS + tuple(sorted(k for k in out["metrics"]["tuned"] if k.endswith(":ndcg@10")))
                runs.append({"seed": seed, **{f"tuned_{m}": out["metrics"]["tuned"][m] for m in metrics},
                             **{f"base_{m}": out["metrics"]["base"][m] for m in metrics},
                             "queries": out["metrics"]["tuned"]["queries"]})
                print(name, seed, runs[-1], flush=True)
        summary = {"recipe": RECIPES[name], "overrides": args.overrides, "seeds": args.seeds, "runs": runs,
                   "queries": runs[0]["queries"]}
        for m in metrics:
            for side in ("base", "tuned"):
                vals = [r[f"{side}_{m}"] for r in runs]
                summary[f"{side}_{m}_mean"] = statistics.mean(vals)
                summary[f"{side}_{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lifts = [r[f"tuned_{m}"] - r[f"base_{m}"] for r in runs]
            summary[f"lift_{m}_mean"] = statistics.mean(lifts)
            summary[f"lift_{m}_std"] = statistics.stdev(lifts) if len(lifts) > 1 else 0.0
            summary[f"lift_{m}_min"] = min(lifts)
        result["recipes"][name] = summary
        atomic_write_json(out_path, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
