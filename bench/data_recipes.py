"""Benchmark: the CPRM in-context corpus from 1M and 10M synthetic interactions over 100k items, and its scaling.

    .venv/bin/python bench/data_recipes.py [--events 1000000 10000000] [--items 100000] [--threads 2] [--shards 1]

Targets: at 1M events <= 60 s and <= 2 GB peak RSS (issue 2); at 10M <= 10x the 1M time and <= 4 GB peak
(issue 14), on 2 cores. The synthetic search log (users issue queries and click items; popular queries and
items follow a Zipf-like law; 10 events per user) is written to Parquet first; then, per size, a child
process limited to `--threads` Polars threads does what `recforge data` does: reads the log with the
recforge reader (row-level validation + rejects), serialises the catalogue, and builds the in-context
corpus (items_by_query, queries_by_item, user_sequence) with packing and the leakage check. The child
reports its own peak RSS (getrusage). The scaling exponent is log(t_10M / t_1M) / log(10) (1 = linear).

With `--shards N`, each size also runs as N sequential `--shard i/N` children (what N array-job tasks would
do), reporting the largest shard's time and peak RSS. Side by side in the first child, on the same events,
it also times the co-click grouping step done with Python dicts over rows, to show what the Polars
group-bys buy. Writes bench/results/data_recipes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data_recipes.json"
WORDS = ("red blue green black white steel cotton leather wooden small large mini pro ultra classic modern "
         "vintage portable wireless kids men women outdoor kitchen garden office travel home sport winter "
         "summer case cover bag shoe lamp chair table mug bottle charger cable phone watch book pen").split()


def make_data(folder: Path, n_events: int, n_items: int, seed: int = 0) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

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


def worker(folder: Path, shard_text: str | None = None, compare_dicts: bool = True) -> dict:
    from recforge.data_recipes import builders as B
    from recforge.readers import RejectLog, SourceConfig, read_interactions, read_items
    from recforge.data_recipes.recipe_config import InContextCorpus
    from recforge.data_recipes.serialize import Serializer, SerializerConfig, TokenCounter
    from recforge.data_recipes.splits import SplitConfig
    from recforge.records import Query
    from recforge.shards import ShardSpec

    shard = ShardSpec.parse(shard_text)

    from peak_memory import reset_hwm, status_bytes

    timings, phase_peak_mb = {}, {}

    def phase_done(name: str) -> None:  # the peak RSS of the phase that just ended, then a fresh high-water mark
        phase_peak_mb[name] = round(status_bytes("VmHWM") / 2**20, 1)
        reset_hwm()

    reset_hwm()
    t0 = time.perf_counter()
    rejects = RejectLog(None)
    items = read_items(SourceConfig(path=str(folder / "items.parquet"), id="item_id", fields={"title": "title"}), rejects)
    events = read_interactions(SourceConfig(path=str(folder / "events.parquet"), fields={
        "user_id": "user_id", "item_id": "item_id", "query_id": "query_id", "timestamp": "ts"}), rejects)
    timings["read_s"] = time.perf_counter() - t0
    phase_done("read")

    t1 = time.perf_counter()
    serializer = Serializer(SerializerConfig(style="pieces", fields=["title"]))
    item_texts = B.item_text_frame(items, serializer)
    query_texts = B.query_text_frame([Query(q, f"query {q}") for q in events["query_id"].unique().sort()], serializer)
    timings["serialize_s"] = time.perf_counter() - t1
    phase_done("serialize")

    t2 = time.perf_counter()
    cfg = InContextCorpus(relations=["items_by_query", "queries_by_item", "user_sequence"], max_tokens=512,
                          chunk_rows=250_000)
    built = B.build_in_context(cfg, SplitConfig.uniform(10), TokenCounter(), item_texts, query_texts,
                               None, events, shard=shard)
    timings["build_in_context_s"] = time.perf_counter() - t2
    phase_done("build_in_context")

    grouping = {}
    if compare_dicts:  # side by side: the grouping step alone, Polars group-by vs Python dicts, same events
        links, _ = B.split_links(B.links_from_interactions(events, None), "item_id", SplitConfig.uniform(0))
        t3 = time.perf_counter()
        members = B.group_members(links, "query_id", "item_id", 256, cfg.chunk_rows)
        polars_group_s = time.perf_counter() - t3
        dict_group_s, dict_members = python_dict_grouping(events)
        assert dict_members == members.height, (dict_members, members.height)
        grouping = {"grouping_polars_s": round(polars_group_s, 3), "grouping_python_dicts_s": round(dict_group_s, 3)}

    rows = built.frame.height
    return {
        "events": events.height, "items": len(items), "rows": rows,
        "rows_by_relation": {k: v.get("rows") for k, v in built.report["relations"].items()},
        "docs_per_row_mean": round(built.frame["doc_ids"].list.len().mean(), 2),
        "leakage_ok": all(r["ok"] for r in built.report["splits"].values()),
        "rejects": rejects.total,
        # where the memory is: the events as read, and the built rows (documents + joined text) held until written
        "events_frame_mb": round(events.estimated_size("mb"), 1),
        "output_frame_mb": round(built.frame.estimated_size("mb"), 1),
        "phase_peak_rss_mb": phase_peak_mb,
        **{k: round(v, 3) for k, v in timings.items()},
        **grouping,
        "pipeline_s": round(sum(timings.values()), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }


def run_child(folder: Path, threads: int, shard: str | None, compare_dicts: bool) -> dict:
    env = {**os.environ, "POLARS_MAX_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "RAYON_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", str(folder)] + (["--shard", shard] if shard else [])
    cmd += [] if compare_dicts else ["--no-dicts"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({shard or 'unsharded'}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "child_wall_s": round(time.perf_counter() - start, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1, help="also run each size as N sequential shards")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--no-dicts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shard, not args.no_dicts)))
        return 0

    load_before = os.getloadavg()
    sizes = []
    for n_events in sorted(args.events):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            shape = make_data(folder, n_events, args.items)
            res = run_child(folder, args.threads, None, compare_dicts=n_events == min(args.events))
            entry = {"synthetic": shape, **res, "rows_per_s": round(res["rows"] / res["build_in_context_s"], 1),
                     "events_per_s": round(res["events"] / res["pipeline_s"], 1)}
            if args.shards > 1:
                parts = [run_child(folder, args.threads, f"{i}/{args.shards}", False) for i in range(args.shards)]
                entry["sharded"] = {"shards": args.shards, "rows": sum(p["rows"] for p in parts),
                                    "max_shard_pipeline_s": max(p["pipeline_s"] for p in parts),
                                    "max_shard_build_s": max(p["build_in_context_s"] for p in parts),
                                    "max_shard_peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
                                    "rows_equal_unsharded": sum(p["rows"] for p in parts) == res["rows"]}
        sizes.append(entry)
        print(f"{n_events:>11,} events: read {res['read_s']:.1f}s  serialize {res['serialize_s']:.1f}s  "
              f"build {res['build_in_context_s']:.1f}s  -> {res['pipeline_s']:.1f}s, peak RSS {res['peak_rss_mb']:,.0f} MB, "
              f"{res['rows']:,} rows" + (f"; {args.shards} shards: largest {entry['sharded']['max_shard_pipeline_s']:.1f}s, "
                                         f"{entry['sharded']['max_shard_peak_rss_mb']:,.0f} MB" if args.shards > 1 else ""))
    small, large = sizes[0], sizes[-1]
    result = {
        "benchmark": "data_recipes in_context corpus",
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "sizes": sizes,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "read_s is the recforge row-validating reader; peak RSS is the child's own (getrusage)",
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
    result["target"], result["meets_target"] = targets, meets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"targets met: {meets}; written to {args.out}")
    return 0  # a missed target is reported (JSON + this line), like every bench here; `make bench` runs them all


if __name__ == "__main__":
    sys.exit(main())
