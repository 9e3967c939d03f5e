"""Model selection for the LLM embedder (issue 25) on VALIDATION queries carved from the training queries.

Every run is `recforge align align/recipes/esci_smollm2.yaml data.esci.eval_on=validation ...`: a salted hash of
query_id sets ~20 % of the TRAINING queries aside (`data.esci.validation_fraction`), the model trains on the rest
and is scored on them; the held-out queries and their judgments are never used. Each grid point records the
validation NDCG@10 / recall@50 / MRR@10 of the untuned and trained model, the wall time, torch threads and the
load average. Finished points are skipped (resumable); results go to bench/results/align_llm_sweep.json.

    .venv/bin/python bench/align_llm_sweep.py                        # the default grid
    .venv/bin/python bench/align_llm_sweep.py --grid pooling --threads 2
    .venv/bin/python bench/align_llm_sweep.py --recipe align/recipes/esci_smollm2.yaml --extra backbone.path=PATH
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides on top of the recipe (and of the shared ones below). Kept small enough for 2 CPU cores.
GRIDS: dict[str, dict[str, list[str]]] = {
    # pooling (mean over content tokens / EOS last token) x LoRA vs full fine-tuning at a middle layer, then the layer
    # and the learning rate around the winner; 2 epochs, 32 tokens (the recipe's), no hard negatives (speed)
    "pooling": {
        "mean_l8_full_lr1e-4": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=1e-4"],
        "mean_l8_lora_lr1e-3": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=true", "train.learning_rate=1e-3"],
        "last_l8_full_lr1e-4": ["pooling.mode=last_token", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=1e-4"],
    },
    "layer_lr": {
        "mean_l15_full_lr1e-4": ["pooling.mode=mean", "backbone.num_layers=15", "backbone.lora=false", "train.learning_rate=1e-4"],
        "mean_l8_full_lr3e-5": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=3e-5"],
        "mean_l8_full_lr3e-4": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=3e-4"],
    },
    "steps_len": {
        "mean_l8_full_lr1e-4_ep4": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=1e-4", "train.num_train_epochs=4"],
        "mean_l8_full_lr1e-4_len64": ["pooling.mode=mean", "backbone.num_layers=8", "backbone.lora=false", "train.learning_rate=1e-4", "backbone.max_seq_length=64"],
        "mean_l30_full_lr1e-4": ["pooling.mode=mean", "backbone.num_layers=30", "backbone.lora=false", "train.learning_rate=1e-4"],
    },
}
SHARED = ["data.esci.eval_on=validation", "train.num_train_epochs=2", "train.bf16=false", "loss.use_hard_negatives=false",
          "train.logging_steps=3"]


def metrics_of(out: Path) -> dict | None:
    path = out / "eval" / "retrieval_metrics.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    res = report["results"]
    keep = ("ndcg@10", "recall@50", "mrr@10", "recall@10", "queries")
    return {"base": {k: res["base"].get(k) for k in keep} if "base" in res else None,
            "tuned": {k: res["tuned"].get(k) for k in keep}, "timing": report.get("timing"),
            "train": {k: report.get("train", {}).get(k) for k in ("steps", "first_logged_loss", "last_logged_loss", "train_rows")},
            "validation": report.get("data_notes", {}).get("validation")}


def run_point(name: str, overrides: list[str], recipe: str, runs: Path, threads: int, seed: int, extra: list[str]) -> dict:
    out = runs / name
    cmd = [str(ROOT / ".venv/bin/recforge"), "align", recipe, *SHARED, *overrides, *extra, f"seed={seed}", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return {"name": name, "overrides": overrides + extra, "seed": seed, "rc": rc, "wall_seconds": round(time.perf_counter() - t0, 1),
            "threads": threads, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
            "command": " ".join(cmd[1:]), **(metrics_of(out) or {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="+", default=["pooling"], choices=sorted(GRIDS))
    ap.add_argument("--only", nargs="*", default=None, help="grid point names to run")
    ap.add_argument("--recipe", default="align/recipes/esci_smollm2.yaml")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every point")
    ap.add_argument("--runs", default="runs/bench/align_llm_sweep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1, help="grid points run at once (each with --threads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/align_llm_sweep.json")
    args = ap.parse_args()
    out_path = ROOT / args.out
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    report.update({"benchmark": "align_llm_sweep", "recipe": args.recipe, "shared_overrides": SHARED,
                   "selection": "validation queries: a salted-hash share of the TRAINING queries "
                                "(data.esci.eval_on=validation); held-out queries never used",
                   "host": {"cpus": os.cpu_count()}})
    points = report.setdefault("points", {})
    todo = []
    for grid in args.grid:
        for name, overrides in GRIDS[grid].items():
            if args.only and name not in args.only:
                continue
            done = points.get(name)
            if done and done.get("rc") == 0 and done.get("tuned") and done.get("overrides") == overrides + args.extra:
                print(f"skip {name} (done)")
                continue
            todo.append((name, overrides))
    lock = threading.Lock()

    def one(item):
        name, overrides = item
        print(f"run {name}: {' '.join(overrides)}", flush=True)
        p = run_point(name, overrides, args.recipe, ROOT / args.runs, args.threads, args.seed, args.extra)
        p["parallel_runs"] = args.parallel
        print(f"  {name}: rc={p['rc']} {p['wall_seconds']} s  val ndcg@10 base {((p.get('base') or {}).get('ndcg@10'))} "
              f"tuned {((p.get('tuned') or {}).get('ndcg@10'))}", flush=True)
        with lock:
            points[name] = p
            ok = {k: v for k, v in points.items() if v.get("rc") == 0 and v.get("tuned")}
            if ok:
                best = max(ok, key=lambda k: ok[k]["tuned"]["ndcg@10"])
                report["winner"] = {"name": best, "overrides": ok[best]["overrides"], "validation": ok[best]["tuned"]}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1) + "\n")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        list(pool.map(one, todo))
    print(json.dumps(report.get("winner"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def sweep_markdown(report: dict) -> str:
    """The sweep as the docs show it (docs/results/align.md includes this file)."""
    lines = ["## SmolLM2 as an embedding model: the sweep (validation queries carved from the training queries)", "",
             f"Selection: {report['selection']}.", "",
             "| point | overrides | validation NDCG@10 untuned | trained | recall@50 trained | wall s | threads | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in report["points"].items():
        t = p.get("tuned") or {}
        lines.append(f"| {name} | `{' '.join(p['overrides'])}` | {p['base']['ndcg@10']:.3f} | {t.get('ndcg@10', float('nan')):.3f} | "
                     f"{t.get('recall@50', float('nan')):.3f} | {p['wall_seconds']:.0f} | {p['threads']} | "
                     f"{p['load_avg_start']:.1f}–{p['load_avg_end']:.1f} |")
    w = report["chosen"]
    lines += ["", f"Shipped: **{w['name']}** ({w['shipped_as']}). {w['why']}.", "",
              f"Held-out numbers after the selection: {w['heldout_after_selection']}.", "",
              "Not run: " + ", ".join(n for k, v in report["grid_not_run"].items() if k != "why" for n in v)
              + f" ({report['grid_not_run']['why']})", ""]
    return "\n".join(lines)


def write_sweep_markdown(json_path: str = "bench/results/align_llm_sweep.json") -> None:
    path = Path(json_path)
    path.with_suffix(".md").write_text(sweep_markdown(json.loads(path.read_text())))
