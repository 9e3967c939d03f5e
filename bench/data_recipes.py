"""Benchmark: `recforge data` building the CPRM in-context corpus from 1M and 10M synthetic interactions over
100k items, its scaling, and `--merge` of N shards.

    .venv/bin/python bench/data_recipes.py [--events 1000000 10000000] [--items 100000] [--threads 2] [--shards 16]

Targets: at 1M events <= 60 s and <= 2 GB peak RSS (issue 2); at 10M <= 10x the 1M time and <= 4 GB peak in one
process (issues 14, 27); the merge of N shards within 1.2x the largest shard's peak RSS (issue 27), on 2 cores.
The synthetic search log (users issue queries and click items; popular queries and items follow a Zipf-like
law; 10 events per user) is written to Parquet with the catalogue, the query texts and a recipe; then, per
size, a child process limited to `--threads` Polars threads runs `recforge data` on it (`run_data`: reads the
log with row-level validation + rejects, serialises the catalogue, builds and writes the in-context corpus -
items_by_query, queries_by_item, user_sequence - with packing and the leakage checks). The child reports its
phases' peak RSS (VmHWM, reset between phases) and its own peak (getrusage). The scaling exponent is
log(t_10M / t_1M) / log(10) (1 = linear).

With `--shards N` (alias `--merge-shards`), each size also runs as N sequential `recforge data --shard i/N`
children (what N array-job tasks would do), then one `recforge data --merge` child; it reports the largest
shard's time and peak RSS, the merge's, and whether the merged corpus is the unsharded one, row for row.
Side by side in the first child, on the same events, it also times the co-click grouping step done with
Python dicts over rows, to show what the Polars group-bys buy. Writes bench/results/data_recipes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data_recipes.json"
WORDS = ("red blue green black white steel cotton leather wooden small large mini pro ultra classic modern "
         "vintage portable wireless kids men women outdoor kitchen garden office travel home sport winter "
         "summer case cover bag shoe lamp chair table mug bottle charger cable phone watch book pen").split()
RELATIONS = ["items_by_query", "queries_by_item", "user_sequence"]


def make_data(folder: Path, n_events: int, n_items: int, seed: int = 0) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rng = np.random.default_rng(seed)
    n_users, n_queries = max(1, n_events // 10), max(1, n_items // 5)
    # catalogue: 6-14 words per title
    lengths = rng.integers(6, 15, size=n_items)
    words = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    cuts = np.cumsum(lengths)[:-1]
    titles = [f"item {i} " + " ".join(WORDS[w] for w in chunk) for i, chunk in enumerate(np.split(words, cuts))]
    pq.write_table(pa.table({"item_id": [str(i) for i in range(n_items)], "title": titles}), folder / "items.parquet")
    # search log: Zipf-ish queries; each query clicks items near its own anchor item; users act in time order
    query = np.minimum(rng.zipf(1.3, size=n_events) - 1, n_queries - 1)
    offset = np.minimum(rng.zipf(1.6, size=n_events) - 1, 200)
    item = (query.astype(np.int64) * 7919 + offset) % n_items
    user = rng.integers(0, n_users, size=n_events)
    ts = np.arange(n_events, dtype=np.float64)
    pq.write_table(pa.table({
        "user_id": user.astype(str), "query_id": query.astype(str), "item_id": item.astype(str), "ts": ts,
    }), folder / "events.parquet")
    # the texts of the queries the log holds ("query <id>"), and the recipe `recforge data` runs
    seen = sorted(set(query.astype(str).tolist()))
    pq.write_table(pa.table({"query_id": seen, "text": [f"query {q}" for q in seen]}), folder / "queries.parquet")
    recipe = {
        "inputs": {
            "items": {"path": str(folder / "items.parquet"), "id": "item_id", "fields": {"title": "title"}},
            "queries": {"path": str(folder / "queries.parquet"), "id": "query_id", "fields": {"text": "text"}},
            "interactions": {"path": str(folder / "events.parquet"), "fields": {
                "user_id": "user_id", "item_id": "item_id", "query_id": "query_id", "timestamp": "ts"}},
        },
        "serializer": {"style": "pieces", "fields": ["title"]},
        "split": {"eval_percent": {e: 10 for e in ("query", "item", "user", "book", "doc")}},
        "in_context": {"relations": RELATIONS, "max_tokens": 512, "chunk_rows": 250_000},
        **{name: {"enabled": False} for name in ("items", "queries", "query_item", "reading", "pairs")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"users": n_users, "queries": n_queries, "items": n_items, "events": n_events}


def python_dict_grouping(frame) -> tuple[float, int]:
    """The co-click grouping done with Python dicts over rows (what the builder avoids)."""
    start = time.perf_counter()
    groups: dict[str, dict[str, float]] = {}
    for q, i in zip(frame["query_id"].to_list(), frame["item_id"].to_list()):
        members = groups.setdefault(q, {})
        members[i] = members.get(i, 0.0) + 1.0
    ranked = {q: sorted(m.items(), key=lambda kv: (-kv[1], kv[0]))[:256] for q, m in groups.items()}
    return time.perf_counter() - start, sum(len(v) for v in ranked.values())


def worker(folder: Path, out: Path, shard_text: str | None = None, compare_dicts: bool = True) -> dict:
    """One `recforge data` run (`run_data`, what the CLI calls) with its phases timed and their peak RSS."""
    from recforge.config import load_recipe
    from recforge.data_recipes import build
    from recforge.data_recipes import in_context as B
    from recforge.data_recipes.recipe_config import DataRecipe
    from recforge.data_recipes.splits import SplitConfig
    from recforge.shards import ShardSpec

    from peak_memory import reset_hwm, status_bytes

    shard = ShardSpec.parse(shard_text)
    cfg = load_recipe(DataRecipe, folder / "recipe.yaml", [f"out_dir={out}"])
    timings, phase_peak_mb, held = {}, {}, {}
    clock = {"t": 0.0}

    def phase_done(name: str) -> None:  # the peak RSS of the phase that just ended, then a fresh high-water mark
        now = time.perf_counter()
        timings[f"{name}_s"] = now - clock["t"]
        clock["t"] = now
        phase_peak_mb[name] = round(status_bytes("VmHWM") / 2**20, 1)
        reset_hwm()

    read_inputs, stream, write_corpus = build.read_inputs, B.build_in_context_stream, build.write_corpus

    def timed_read(*args, **kwargs):
        got = read_inputs(*args, **kwargs)
        held["events"] = got.interactions
        phase_done("read")
        return got

    def timed_stream(*args, **kwargs):  # serialising the catalogue happens between reading and this
        phase_done("serialize")
        return stream(*args, **kwargs)

    def timed_write(rows, out_dir, name, *args, **kwargs):
        written = write_corpus(rows, out_dir, name, *args, **kwargs)
        if name == "in_context":  # built while written: one phase
            phase_done("build_in_context")
        return written

    build.read_inputs, B.build_in_context_stream, build.write_corpus = timed_read, timed_stream, timed_write
    reset_hwm()
    clock["t"] = t0 = time.perf_counter()
    manifest = build.run_data(cfg, shard=shard)
    pipeline_s = time.perf_counter() - t0
    # the run's peak: the largest of its phases' VmHWM and of what followed the last phase (not getrusage's
    # ru_maxrss: Linux carries it over fork + exec, so a child reports at least the bench parent's peak)
    peak_mb = max([round(status_bytes("VmHWM") / 2**20, 1), *phase_peak_mb.values()])
    events = held["events"]

    grouping = {}
    if compare_dicts:  # side by side: the grouping step alone, Polars group-by vs Python dicts, same events
        links, _ = B.split_links(B.links_from_interactions(events, None), "item_id", SplitConfig.uniform(0))
        t3 = time.perf_counter()
        members = B.group_members(links, "query_id", "item_id", 256, cfg.in_context.chunk_rows)
        polars_group_s = time.perf_counter() - t3
        dict_group_s, dict_members = python_dict_grouping(events)
        assert dict_members == members.height, (dict_members, members.height)
        grouping = {"grouping_polars_s": round(polars_group_s, 3), "grouping_python_dicts_s": round(dict_group_s, 3)}

    corpus = manifest["corpora"]["in_context"]
    return {
        "events": events.height, "items": next(i["rows"] for i in manifest["inputs"] if i["name"] == "items"),
        "rows": sum(corpus["rows"].values()),
        "rows_by_relation": {k: v.get("rows") for k, v in corpus["report"]["relations"].items()},
        "leakage_ok": manifest["splits"]["leakage_ok"],
        "rejects": manifest["rejects"]["total"],
        # the events as read stay in memory; the built rows do not (written a batch at a time)
        "events_frame_mb": round(events.estimated_size("mb"), 1),
        "phase_peak_rss_mb": phase_peak_mb,
        **{k: round(v, 3) for k, v in timings.items()},
        **grouping,
        "pipeline_s": round(pipeline_s, 3),
        "peak_rss_mb": peak_mb,
    }


def merge_worker(folder: Path, out: Path) -> dict:
    """One `recforge data --merge` run (`merge_shards`), timed, with its own peak RSS."""
    from recforge.config import load_recipe
    from recforge.data_recipes.shard_merge import merge_shards
    from recforge.data_recipes.recipe_config import DataRecipe

    from peak_memory import status_bytes

    cfg = load_recipe(DataRecipe, folder / "recipe.yaml", [f"out_dir={out}"])
    t0 = time.perf_counter()
    manifest = merge_shards(cfg)
    return {"merge_s": round(time.perf_counter() - t0, 3),
            "rows": sum(manifest["corpora"]["in_context"]["rows"].values()),
            "leakage_ok": manifest["splits"]["leakage_ok"],
            "peak_rss_mb": round(status_bytes("VmHWM") / 2**20, 1)}  # this process' own since exec


def run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "POLARS_MAX_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "RAYON_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "child_wall_s": round(time.perf_counter() - start, 3)}


def corpus_stats(out: Path) -> dict:
    """Documents per row and size on disk of the written in-context corpus, read a batch at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted((out / "in_context").glob("*.parquet"))
    rows = docs = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["doc_ids"]):
            rows += batch.num_rows
            docs += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0
    return {"docs_per_row_mean": round(docs / max(rows, 1), 2),
            "output_parquet_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)}


def same_rows(a: Path, b: Path) -> bool:
    """The two in-context corpora hold the same rows per split: (row id, hash of the whole row) pairs, read a
    file at a time. A merge writes the rows shard by shard, so its order differs from one run's (as it always
    did): the pairs are compared sorted."""
    import polars as pl

    def rows(folder: Path, split: str) -> pl.DataFrame:
        parts = [pl.read_parquet(f).select("row_id", pl.struct(pl.all()).hash(seed=1).alias("h"))
                 for f in sorted((folder / "in_context").glob(f"{split}-*.parquet"))]
        return pl.concat(parts).sort("row_id") if parts else pl.DataFrame(schema={"row_id": pl.Utf8, "h": pl.UInt64})

    return all(rows(a, split).equals(rows(b, split)) for split in ("train", "eval"))


def sharded(folder: Path, threads: int, n: int, whole: Path, rows: int) -> dict:
    out = folder / "sharded"
    parts = [run_child(["--worker", str(folder), "--out-dir", str(out), "--shard", f"{i}/{n}", "--no-dicts"], threads)
             for i in range(n)]
    merged = run_child(["--merge-worker", str(folder), "--out-dir", str(out)], threads)
    max_shard_peak = max(p["peak_rss_mb"] for p in parts)
    return {"shards": n, "rows": sum(p["rows"] for p in parts),
            "max_shard_pipeline_s": max(p["pipeline_s"] for p in parts),
            "max_shard_build_s": max(p["build_in_context_s"] for p in parts),
            "max_shard_peak_rss_mb": max_shard_peak,
            "rows_equal_unsharded": sum(p["rows"] for p in parts) == rows,
            "merge_s": merged["merge_s"], "merge_child_wall_s": merged["child_wall_s"],
            "merge_peak_rss_mb": merged["peak_rss_mb"],
            "merge_peak_vs_max_shard": round(merged["peak_rss_mb"] / max_shard_peak, 3),
            "merged_rows": merged["rows"], "merge_leakage_ok": merged["leakage_ok"],
            "merged_equals_unsharded": merged["rows"] == rows and same_rows(out, whole)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shards", "--merge-shards", type=int, default=1,
                        help="also run each size as N sequential shards, then their --merge")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merge-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--no-dicts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.out_dir, args.shard, not args.no_dicts)))
        return 0
    if args.merge_worker:
        print(json.dumps(merge_worker(args.merge_worker, args.out_dir)))
        return 0

    load_before = os.getloadavg()
    sizes = []
    for n_events in sorted(args.events):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            shape = make_data(folder, n_events, args.items)
            whole = folder / "out"
            res = run_child(["--worker", str(folder), "--out-dir", str(whole)]
                            + ([] if n_events == min(args.events) else ["--no-dicts"]), args.threads)
            entry = {"synthetic": shape, **res, **corpus_stats(whole),
                     "rows_per_s": round(res["rows"] / res["build_in_context_s"], 1),
                     "events_per_s": round(res["events"] / res["pipeline_s"], 1),
                     "load_average_1min_after": round(os.getloadavg()[0], 2)}
            if args.shards > 1:
                entry["sharded"] = sharded(folder, args.threads, args.shards, whole, res["rows"])
                entry["sharded"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        sizes.append(entry)
        part = entry.get("sharded")
        print(f"{n_events:>11,} events: read {res['read_s']:.1f}s  serialize {res['serialize_s']:.1f}s  "
              f"build+write {res['build_in_context_s']:.1f}s  -> {res['pipeline_s']:.1f}s, peak RSS "
              f"{res['peak_rss_mb']:,.0f} MB, {res['rows']:,} rows"
              + (f"; {args.shards} shards: largest {part['max_shard_pipeline_s']:.1f}s, {part['max_shard_peak_rss_mb']:,.0f} MB;"
                 f" merge {part['merge_s']:.1f}s, {part['merge_peak_rss_mb']:,.0f} MB "
                 f"({part['merge_peak_vs_max_shard']:.2f}x the largest shard's)" if part else ""), flush=True)
    small, large = sizes[0], sizes[-1]
    result = {
        "benchmark": "data_recipes in_context corpus",
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "sizes": sizes,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": ("each child runs `recforge data` (run_data): read_s reads the inputs with row-level validation "
                 "(the Parquet log column-wise, data_recipes/lazy_read.py), build_in_context_s builds and writes "
                 "the corpus a batch at a time (no built rows held, so no output_frame_mb); pipeline_s is the whole "
                 "run; peak_rss_mb is the child's own peak RSS from /proc VmHWM (phase peaks: VmHWM reset between "
                 "phases), not getrusage, whose ru_maxrss Linux carries over fork + exec from the bench parent"),
    }
    if "grouping_python_dicts_s" in small:
        result["grouping_speedup_vs_python_dicts"] = round(small["grouping_python_dicts_s"] / max(small["grouping_polars_s"], 1e-9), 2)
    targets = {"1M_max_s": 60, "1M_max_rss_mb": 2048}
    meets = {"1M": small["pipeline_s"] <= 60 and small["peak_rss_mb"] <= 2048}
    if len(sizes) > 1:
        ratio = large["pipeline_s"] / small["pipeline_s"]
        scale = large["events"] / small["events"]
        result["time_ratio"] = round(ratio, 2)
        result["scaling_exponent"] = round(math.log(ratio) / math.log(scale), 3)
        targets.update({"10M_max_time_ratio": 10, "10M_max_rss_mb": 4096})
        meets["10M"] = ratio <= 10 and large["peak_rss_mb"] <= 4096
        print(f"time ratio {ratio:.2f}x for {scale:.0f}x the events (scaling exponent {result['scaling_exponent']})")
    if "sharded" in large:
        targets["merge_max_peak_vs_max_shard"] = 1.2
        meets["merge"] = large["sharded"]["merge_peak_vs_max_shard"] <= 1.2 and large["sharded"]["merged_equals_unsharded"]
    result["target"], result["meets_target"] = targets, meets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"targets met: {meets}; written to {args.out}")
    return 0  # a missed target is reported (JSON + this line), like every bench here; `make bench` runs them all


if __name__ == "__main__":
    sys.exit(main())
