"""Issue 25's table: held-out ESCI retrieval over 3 seeds for MiniLM untuned / real pairs / real + LLM pseudo-queries
and the SmolLM2 embedder (esci_smollm2.yaml, the sweep's winner) real / real + pseudo-queries.

The pseudo-query chain is the one `make align-pseudo` runs: `recforge generate` (k queries per catalogue item) ->
`recforge pseudo-filter` (round-trip consistency with the current embedder) -> `recforge align` with
`data.extra_pairs` -> held-out evaluation. Generation is read from `--generated` (a finished generate run; its
wall time is read from its manifest), the filter and the align runs are run here (resumable: finished runs are
skipped). Writes bench/results/align_pseudo_queries.{json,md}.

    .venv/bin/python bench/align_pseudo.py --generated runs/generate/esci_pseudo_queries --seeds 0 1 2
    .venv/bin/python bench/align_pseudo.py --variants minilm_real minilm_pseudo    # some rows only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recforge.io import atomic_write_json, atomic_write_text  # noqa: E402  (a killed run leaves no half-written table)
METRICS = ("ndcg@10", "recall@50", "mrr@10")

VARIANTS = {
    "minilm_real": ("align/recipes/esci_minilm.yaml", False),
    "minilm_pseudo": ("align/recipes/esci_minilm_pseudo.yaml", True),
    "smollm2_real": ("align/recipes/esci_smollm2.yaml", False),
    "smollm2_pseudo": ("align/recipes/esci_smollm2.yaml", True),
    # the same recipe from the CPT'd SmolLM2 (--cpt-model, one merged CPT model per seed)
    "smollm2_cpt_real": ("align/recipes/esci_smollm2.yaml", False),
    "smollm2_cpt_pseudo": ("align/recipes/esci_smollm2.yaml", True),
}
MODELS = ("minilm", "smollm2", "smollm2_cpt")


def sh(cmd: list[str], log: Path, threads: int) -> tuple[int, float, float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, round(time.perf_counter() - t0, 1), load0, os.getloadavg()[0]


def stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
            "values": vals}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", default="runs/generate/esci_pseudo_queries")
    ap.add_argument("--filter-recipe", default="align/recipes/esci_pseudo_filter.yaml")
    ap.add_argument("--filter-overrides", nargs="*", default=[])
    ap.add_argument("--generate-load", help="the load average the generation ran at (recorded beside its time)")
    ap.add_argument("--pseudo-weight", type=float, default=1.0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every align run")
    ap.add_argument("--llm-extra", nargs="*", default=[], help="overrides for the SmolLM2 runs")
    ap.add_argument("--cpt-model", default="runs/bench/cpt/seed{seed}/merged/merged",
                    help="the CPT'd SmolLM2 of the smollm2_cpt_* variants ({seed}: the align seed's own CPT run)")
    ap.add_argument("--runs", default="runs/bench/align_pseudo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1, help="align runs at once (each with --threads)")
    ap.add_argument("--out", default="bench/results/align_pseudo_queries.json")
    args = ap.parse_args()
    runs = ROOT / args.runs
    rf = str(ROOT / ".venv/bin/recforge")
    out_path = ROOT / args.out
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    report.update({"benchmark": "align_pseudo_queries", "generated": args.generated, "seeds": args.seeds,
                   "heldout": "the project split's held-out ESCI queries (never read by generate / filter / align training)"})
    steps = report.setdefault("steps", {})

    # generation: read back (its own run; `make align-pseudo` or the generate recipe made it)
    gen_manifest = ROOT / args.generated / "manifest.json"
    if gen_manifest.is_file():
        m = json.loads(gen_manifest.read_text())
        steps["generate"] = {"manifest": str(gen_manifest.relative_to(ROOT)) if gen_manifest.is_relative_to(ROOT) else str(gen_manifest),
                             "elapsed_s": m.get("elapsed_s"), "engine": m.get("engine"), "load_avg": args.generate_load,
                             "model": (m.get("model_used") or {}).get("name_or_path"), "items": m.get("input_rows"),
                             "rows_ok": (m.get("progress") or {}).get("rows_done"),
                             "rows_failed": (m.get("failures") or {}).get("rows"),
                             "tokens": {k: (m.get("progress") or {}).get(k) for k in ("prompt_tokens", "completion_tokens")}}

    filt_dir = runs / "filter"
    need_pseudo = any(VARIANTS[v][1] for v in args.variants)
    if need_pseudo and not (filt_dir / "filter_report.json").is_file():
        rc, wall, l0, l1 = sh([rf, "pseudo-filter", args.filter_recipe, f"generated={args.generated}", f"out_dir={filt_dir}",
                               *args.filter_overrides], runs / "filter.log", args.threads)
        if rc:
            print(f"pseudo-filter failed (rc {rc}), see {runs / 'filter.log'}")
            return rc
        steps["filter_wall_seconds"] = wall
    if (filt_dir / "filter_report.json").is_file():
        steps["filter"] = json.loads((filt_dir / "filter_report.json").read_text())
    pairs = filt_dir / "pairs.parquet"
    extra_pairs = f"data.extra_pairs=[{{path: {pairs}, weight: {args.pseudo_weight}}}]"

    rows = report.setdefault("runs", {})
    todo = []
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}/seed{seed}"
            metrics_path = runs / variant / f"seed{seed}" / "eval" / "retrieval_metrics.json"
            if rows.get(key, {}).get("rc") == 0 and metrics_path.is_file():
                print(f"skip {key}")
                continue
            todo.append((variant, seed))
    lock = threading.Lock()

    def one(item):
            variant, seed = item
            recipe, pseudo = VARIANTS[variant]
            key = f"{variant}/seed{seed}"
            out = runs / variant / f"seed{seed}"
            metrics_path = out / "eval" / "retrieval_metrics.json"
            cmd = [rf, "align", recipe, f"seed={seed}", f"out_dir={out}", *args.extra]
            if variant.startswith("smollm2"):
                cmd += args.llm_extra
            if variant.startswith("smollm2_cpt"):
                cmd.append(f"backbone.path={args.cpt_model.format(seed=seed)}")
            if pseudo:
                cmd += [extra_pairs, "loss.use_pair_weights=true"]
            if seed != args.seeds[0]:
                cmd.append("eval.compare_base=false")  # the untuned model is the same on every seed
            print(f"run {key}", flush=True)
            rc, wall, l0, l1 = sh(cmd, runs / variant / f"seed{seed}.log", args.threads)
            row = {"rc": rc, "wall_seconds": wall, "threads": args.threads, "load_avg_start": l0, "load_avg_end": l1,
                   "command": " ".join(cmd[1:])}
            if rc == 0 and metrics_path.is_file():
                r = json.loads(metrics_path.read_text())
                row.update({"tuned": {m: r["results"]["tuned"].get(m) for m in METRICS},
                            "base": {m: r["results"]["base"].get(m) for m in METRICS} if "base" in r["results"] else None,
                            "queries": r["results"]["tuned"].get("queries"), "train": r.get("train"), "timing": r.get("timing"),
                            "extra_pairs": (r.get("data_notes") or {}).get("extra_pairs")})
            row["parallel_runs"] = args.parallel
            print(f"  {key}: rc={rc} {wall} s {row.get('tuned')}", flush=True)
            with lock:
                rows[key] = row
                summarize(report, args.seeds)
                atomic_write_json(out_path, report)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        list(pool.map(one, todo))
    summarize(report, args.seeds)
    atomic_write_json(out_path, report)
    atomic_write_text(out_path.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


def summarize(report: dict, seeds: list[int]) -> None:
    rows = report.get("runs", {})

    def col(variant: str, part: str, metric: str) -> list:
        return [((rows.get(f"{variant}/seed{s}") or {}).get(part) or {}).get(metric) for s in seeds]

    table = {}
    for variant in VARIANTS:
        if not any(f"{variant}/seed{s}" in rows for s in seeds):
            continue
        table[variant] = {m: stats(col(variant, "tuned", m)) for m in METRICS}
        base = [b for b in col(variant, "base", "ndcg@10") if b is not None]
        if base and variant.endswith("_real"):
            table[variant.replace("_real", "_untuned")] = {m: stats([x for x in col(variant, "base", m) if x is not None][:1])
                                                             for m in METRICS}
    lifts = {}
    for model in MODELS:
        a, b = col(f"{model}_real", "tuned", "ndcg@10"), col(f"{model}_pseudo", "tuned", "ndcg@10")
        d = [y - x for x, y in zip(a, b) if x is not None and y is not None]
        if d:
            lifts[model] = {"per_seed": d, "mean": statistics.fmean(d), "every_seed_positive": all(v > 0 for v in d)}
    report["table"] = table
    report["pseudo_lift_ndcg@10"] = lifts
    mini = lifts.get("minilm")
    llm = table.get("smollm2_real", {}).get("ndcg@10", {}).get("mean")
    cpt = table.get("smollm2_cpt_real", {}).get("ndcg@10", {}).get("mean")
    report["goals"] = {
        "minilm_pseudo_lift_ge_0.03_every_seed_positive": None if not mini else (mini["mean"] >= 0.03 and mini["every_seed_positive"]),
        "smollm2_base_aligned_ge_0.35": None if llm is None else llm >= 0.35,
        "smollm2_cpt_aligned_ge_base_aligned": None if llm is None or cpt is None else cpt >= llm,
        "smollm2_aligned_ge_untuned_minilm": None if llm is None or "minilm_untuned" not in table
        else llm >= table["minilm_untuned"]["ndcg@10"]["mean"],
    }


def markdown(report: dict) -> str:
    t = report.get("table", {})
    f = report.get("steps", {}).get("filter", {})
    lines = ["# Held-out ESCI retrieval: real pairs vs real + LLM pseudo-queries (bench/align_pseudo.py)", "",
             f"Seeds {report.get('seeds')}; mean ± sd over seeds.", "",
             "| model | NDCG@10 | recall@50 | MRR@10 |", "|---|---|---|---|"]
    for k, v in t.items():
        cells = [f"{v[m]['mean']:.4f} ± {v[m]['sd']:.4f} (n={v[m]['n']})" if v[m]["mean"] is not None else "—" for m in METRICS]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    g = report.get("steps", {}).get("generate", {})
    if g:
        lines += ["", f"Generator: {g.get('model')} on the {(g.get('engine') or {}).get('kind')} engine "
                      f"({report.get('generated')}): {g.get('rows_ok')} of {g.get('items')} items answered "
                      f"({g.get('rows_failed')} failed validation after retries), {g.get('elapsed_s')} s wall"
                      + (f" at load average {g['load_avg']}" if g.get("load_avg") else "") + "."]
    walls = {}
    for key, row in report.get("runs", {}).items():
        walls.setdefault(key.split("/")[0], []).append(row.get("wall_seconds"))
    if walls:
        lines += ["", "Align + eval wall seconds per run (mean; load averages in the JSON): "
                  + ", ".join(f"{v} {statistics.fmean([w for w in ws if w]):.0f}" for v, ws in walls.items() if any(ws))]
    if f:
        lines += ["", f"Filter {(f.get('seconds') or {}).get('total')} s. Pseudo-queries: {f.get('generated_queries')} generated for {f.get('items_with_queries')} items, "
                      f"{f.get('kept_pairs')} kept ({100 * f.get('kept_share', 0):.1f} %, own item in the top {f.get('top_k')} by "
                      f"{f.get('model')})."]
    for model, lift in report.get("pseudo_lift_ndcg@10", {}).items():
        lines.append(f"- {model}: pseudo-query lift NDCG@10 {lift['mean']:+.4f} (per seed "
                     + ", ".join(f"{d:+.4f}" for d in lift["per_seed"]) + ")")
    lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in report.get("goals", {}).items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
