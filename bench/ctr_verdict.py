"""The CTR verdict tables (issue 24) -> bench/results/ctr_verdict_{goodbooks,movielens}.{json,md,png}.

`recforge eval ctr align/recipes/ctr_*_verdict.yaml` (`make eval-ctr`) writes verdict.{json,md,png} into its out_dir;
this script copies them into bench/results, adding the measured cost of the generation steps where a timing log
exists (wall, user + system CPU seconds from /usr/bin/time, load average), and with --run it runs the recipes first.
Only aggregate metrics are written: MovieLens-100K data and the text generated from it stay under runs/.

    .venv/bin/python bench/ctr_verdict.py [--run] [--movielens ../shared/data/movielens_100k] [--llm-embedder DIR]
                                          [--gen-times runs/logs/gen_times3.jsonl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results_dir import results_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATASETS = {"goodbooks": "align/recipes/ctr_goodbooks_verdict.yaml", "movielens": "align/recipes/ctr_ml100k_verdict.yaml"}
GEN_STEPS = {"goodbooks": {"item_judgement": "gb_reception", "item_knowledge": "gb_knowledge"},
             "movielens": {"item_judgement": "ml_reception", "item_knowledge": "ml_knowledge"}}


def run(dataset: str, runs: Path, movielens: str, embedder: str) -> None:
    args = [sys.executable, "-m", "recforge", "train-ctr", DATASETS[dataset], f"out_dir={runs / 'ctr' / f'{dataset}_verdict'}",
            f"llm_embedding.model={embedder}"]
    if dataset == "movielens":
        args += [f"inputs.{k}.path={movielens}/{k}.jsonl.gz" for k in ("interactions", "items")]
        args += [f"inputs.knowledge={runs}/generate/movielens_knowledge/features", f"inputs.judgement={runs}/generate/movielens_reception"]
    else:
        args += [f"inputs.knowledge={runs}/generate/goodbooks_knowledge/features", f"inputs.judgement={runs}/generate/goodbooks_reception"]
    subprocess.run(args, cwd=ROOT, check=True)


def llm_items(dataset: str, items_path: str, id_field: str, warm_percent: int, out: Path) -> dict:
    """The items the LLM inputs are generated for when CPU time cannot cover the whole catalogue: every new
    (held-out) item of the verdict recipe's split, plus a random `warm_percent` % of the other items, drawn by a
    hash of the id alone (`sha256("llm-items:" + id) % 100`) so the subset is independent of popularity and labels.
    Writes a JSONL copy of those catalogue rows under runs/ (MovieLens rows are never committed)."""
    import gzip

    from recforge.align.ctr.config import CTRRecipe
    from recforge.config import load_recipe
    from recforge.io import atomic_path, resolve_path
    from recforge.splits import is_eval, stable_hash

    rule = load_recipe(CTRRecipe, DATASETS[dataset], []).split
    kept, total, new = [], 0, 0
    with gzip.open(resolve_path(items_path), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            total += 1
            item = str(row[id_field])
            held = is_eval("item", item, rule)
            if held or stable_hash("llm-items:" + item) % 100 < warm_percent:
                kept.append(line.rstrip("\n"))
                new += held
    with atomic_path(out) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
    info = {"dataset": dataset, "items": total, "kept": len(kept), "new_items": new, "warm_percent": warm_percent, "path": str(out)}
    print(json.dumps(info))
    return info


def _is_part_of(entry: str, step: str) -> bool:
    base, _, index = entry.rpartition("_")
    return entry == step or (base == step and index.isdigit())


def measured_generation(gen_times: Path | None, dataset: str) -> dict:
    """Each LLM input's measured generation from a JSONL of /usr/bin/time entries; data-parallel shards of one step
    (`<step>_0`, `<step>_1`, ...) add up: CPU summed, wall = the slowest shard."""
    if gen_times is None or not gen_times.is_file():
        return {}
    entries = [json.loads(line) for line in gen_times.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = {}
    for name, step in GEN_STEPS[dataset].items():
        parts = [e for e in entries if e["rc"] == 0 and _is_part_of(e["step"], step)]
        if not parts:
            continue
        cpu = sum(e["cpu_user_seconds"] + e["cpu_sys_seconds"] for e in parts)
        out[name] = {"wall_seconds": max(e["wall_seconds"] for e in parts), "cpu_seconds": round(cpu, 1),
                     "cpu_hours": round(cpu / 3600, 4), "processes": len(parts),
                     "load_average_1min_start": min(e["load_start"] for e in parts),
                     "load_average_1min_end": max(e["load_end"] for e in parts),
                     "method": "/usr/bin/time around `recforge generate` (user + system CPU of it and its children)"}
    return out


def collect(dataset: str, runs: Path, gen_times: Path | None) -> bool:
    src = runs / "ctr" / f"{dataset}_verdict"
    if not (src / "verdict.json").is_file():
        print(f"{dataset}: no {src / 'verdict.json'} (run `make eval-ctr` or pass --run): skipped")
        return False
    verdict = json.loads((src / "verdict.json").read_text(encoding="utf-8"))
    measured = measured_generation(gen_times, dataset)
    if measured:
        verdict["generation_measured"] = measured
        for row in verdict["rows"]:  # the measured CPU time replaces the wall x threads bound
            for name, gen in (row["cost"].get("generation") or {}).items():
                if name in measured:
                    gen.update(cpu_hours=measured[name]["cpu_hours"], cpu_hours_method=measured[name]["method"])
            c = row["cost"]
            encode = sum((e or {}).get("encode_cpu_seconds") or 0 for e in (c.get("encode") or {}).values())
            gen_h = sum(g.get("cpu_hours") or 0 for g in (c.get("generation") or {}).values())
            c["total_cpu_hours"] = round(((c.get("train_cpu_seconds") or 0) + encode) / 3600 + gen_h, 4)
    from recforge.align.ctr.verdict import verdict_markdown

    md = verdict_markdown(verdict)
    if measured:
        md += "\nGeneration (measured): " + "; ".join(
            f"{k}: {v['wall_seconds']:.0f} s wall, {v['cpu_hours']:.3f} CPU-h, load {v['load_average_1min_start']}→{v['load_average_1min_end']}"
            for k, v in measured.items()) + "\n"
    from recforge.io import atomic_path, atomic_write_json, atomic_write_text

    out = results_dir(dataset)  # MovieLens results stay under runs/ (never committed)
    atomic_write_json(out / f"ctr_verdict_{dataset}.json", verdict)
    atomic_write_text(out / f"ctr_verdict_{dataset}.md", md)
    with atomic_path(out / f"ctr_verdict_{dataset}.png") as tmp:
        shutil.copyfile(src / "verdict.png", tmp)
    print(md)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run the verdict recipes first")
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--movielens", default=str(ROOT.parent / "shared" / "data" / "movielens_100k"))
    p.add_argument("--gen-times", default=None, help="JSONL of the generation steps' timings (runs/logs/gen_times3.jsonl)")
    p.add_argument("--datasets", nargs="*", default=list(DATASETS))
    p.add_argument("--llm-embedder", default=str(ROOT / "runs" / "pseudo" / "align_llm_real" / "model"),
                   help="the aligned LLM embedder (`make align-pseudo`'s SmolLM2) for the item_llm_embedding variant")
    p.add_argument("--llm-items", type=int, default=None, metavar="WARM_PERCENT",
                   help="only write runs/llm_items/<dataset>_items.jsonl.gz: new items + WARM_PERCENT %% of the others")
    args = p.parse_args()
    runs = Path(args.runs)
    if args.llm_items is not None:
        sources = {"goodbooks": ("sample://goodbooks_10k_ratings_subset/items.jsonl.gz", "book_id"),
                   "movielens": (f"{args.movielens}/items.jsonl.gz", "item_id")}
        for dataset in args.datasets:
            llm_items(dataset, *sources[dataset], args.llm_items, runs / "llm_items" / f"{dataset}_items.jsonl.gz")
        return 0
    for dataset in args.datasets:
        if args.run:
            if dataset == "movielens" and not (Path(args.movielens) / "items.jsonl.gz").is_file():
                print(f"MovieLens-100K not found at {args.movielens}: skipped")
                continue
            run(dataset, runs, args.movielens, args.llm_embedder)
        collect(dataset, runs, Path(args.gen_times) if args.gen_times else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
