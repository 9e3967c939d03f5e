"""Benchmark: `recforge generate --ray --shards N` vs the plain shard loop (N `recforge generate --shard i/N`
processes started together, what a SLURM array or a shell loop does), same recipe, rows and engine, side by side.

    .venv/bin/python bench/generate_ray.py [--model smollm2] [--n 96] [--shards 2] [--repeats 2] [--out PATH]

Arms alternate (plain, ray, plain, ray, ...) so machine load drifts over both alike; every arm writes a fresh
folder. Wall seconds are whole commands (process start, model load, Ray start included): the overhead a user
pays. Both arms must end with the same rows (checked). Each arm records the load average (1, 5, 15 min) just
before it starts: a number measured under load is only compared with one measured under the same load. The
thread settings of both arms are recorded too (torch threads per shard, Ray's CPUs per shard, the thread
variables of the environment the shards inherit). Writes bench/results/generate_ray.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RF = [sys.executable, "-m", "recforge"]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def write_recipe(tmp: Path, model: str, n: int, threads: int) -> Path:
    data = yaml.safe_load((REPO / "generate/recipes/goodbooks_tags.yaml").read_text())
    data["model"] = {"name_or_path": model}
    data["input"]["limit"] = n
    data["engine"] = {"kind": "transformers", "batch_size": 8, "cpu_threads": threads}
    data["chunk_size"] = 8
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def timed(cmds: list[list[str]]) -> float:
    """Start every command at once, wait for all; wall seconds (a failing command fails the benchmark)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p, c in zip(procs, cmds):
        err = p.communicate()[1]
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(c)} failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - t


def rows(out: Path) -> list[tuple]:
    from recforge.generate.runner import read_generations

    return sorted((r["id"], r["output"]) for r in read_generations(out).to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench/results/generate_ray.json"))
    args = ap.parse_args()
    from recforge.models import resolve_model

    model = resolve_model(args.model)
    threads = max(1, (os.cpu_count() or 1) // args.shards)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    recipe = write_recipe(tmp, model, args.n, threads)
    times: dict[str, list[float]] = {"plain_shard_loop": [], "ray": []}
    load: list[dict] = []
    results = {}
    for r in range(args.repeats):
        for arm in ("plain_shard_loop", "ray"):
            out = tmp / f"{arm}-{r}"
            base = [*RF, "generate", str(recipe), f"out_dir={out}", "--no-progress"]
            cmds = ([base + ["--shard", f"{i}/{args.shards}"] for i in range(args.shards)] if arm == "plain_shard_loop"
                    else [base + ["--ray", "--shards", str(args.shards), "--cpus-per-shard", str(threads)]])
            load.append({"arm": arm, "repeat": r, "load_1_5_15": [round(x, 2) for x in os.getloadavg()]})
            times[arm].append(round(timed(cmds), 2))
            results[arm] = rows(out)
            print(arm, r, times[arm][-1], file=sys.stderr)
    assert results["ray"] == results["plain_shard_loop"], "the arms wrote different rows"
    best = {k: min(v) for k, v in times.items()}
    report = {
        "what": "generate --ray vs the plain shard loop (N processes at once), whole-command wall seconds",
        "model": args.model, "engine": "transformers", "rows": args.n, "shards": args.shards,
        "repeats": args.repeats, "wall_s": times,
        "threads": {"torch_threads_per_shard": threads, "ray_cpus_per_shard": threads,
                    "shards_x_threads": args.shards * threads, "cpus": os.cpu_count(),
                    "env": {k: os.environ.get(k) for k in THREAD_ENV},
                    "note": "the engine sets torch's threads to cpu_threads in both arms; Ray also sets OMP_NUM_THREADS "
                            "to a task's num_cpus in its workers where the environment leaves it unset"},
        "best_wall_s": best, "ray_overhead": round(best["ray"] / best["plain_shard_loop"] - 1, 4),
        "same_rows": True, "rows_written": len(results["ray"]),
        "load_average_before_each_arm": load,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("best_wall_s", "ray_overhead")}))


if __name__ == "__main__":
    main()
