"""Benchmark: the CPRM in-context corpus from 1M synthetic interactions over 100k items.

    .venv/bin/python bench/data_recipes.py [--events 1000000] [--items 100000] [--threads 2]

Target (issue 2): <= 60 s and <= 2 GB peak RSS on 2 cores. The synthetic search log (users issue
queries and click items; popular queries and items follow a Zipf-like law) is written to Parquet
first; then a child process, limited to `--threads` Polars threads, does what `recforge data` does:
reads the log with the recforge reader (row-level validation + rejects), serialises the catalogue,
and builds the in-context corpus (items_by_query, queries_by_item, user_sequence) with packing and
the leakage check. The child's peak RSS is measured by the parent (getrusage of children).

Side by side in the same child, on the same events, it also times the co-click grouping step
done the way the issue rules out (Python dicts over rows), to show what the Polars group-bys buy.
Writes bench/results/data_recipes.json.
"""

from __future__ import annotations

import argparse
import json
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


def worker(folder: Path) -> dict:
    from recforge.data_recipes import builders as B
    from recforge.readers import RejectLog, SourceConfig, read_interactions, read_items
    from recforge.data_recipes.recipe_config import InContextCorpus
    from recforge.data_recipes.serialize import Serializer, SerializerConfig, TokenCounter
    from recforge.data_recipes.splits import SplitConfig
    from recforge.records import Query

    timings = {}
    t0 = time.perf_counter()
    rejects = RejectLog(None)
    items = read_items(SourceConfig(path=str(folder / "items.parquet"), id="item_id", fields={"title": "title"}), rejects)
    events = read_interactions(SourceConfig(path=str(folder / "events.parquet"), fields={
        "user_id": "user_id", "item_id": "item_id", "query_id": "query_id", "timestamp": "ts"}), rejects)
    timings["read_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    serializer = Serializer(SerializerConfig(style="pieces", fields=["title"]))
    item_texts = B.item_text_frame(items, serializer)
    query_texts = B.query_text_frame([Query(q, f"query {q}") for q in events["query_id"].unique().sort()], serializer)
    timings["serialize_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    cfg = InContextCorpus(relations=["items_by_query", "queries_by_item", "user_sequence"], max_tokens=512,
                          chunk_rows=250_000)
    built = B.build_in_context(cfg, SplitConfig.uniform(10), TokenCounter(), item_texts, query_texts,
                               None, events)
    timings["build_in_context_s"] = time.perf_counter() - t2

    # side by side: the grouping step alone, Polars group-by vs Python dicts, same events
    links, _ = B.split_links(B.links_from_interactions(events, None), "item_id", SplitConfig.uniform(0))
    t3 = time.perf_counter()
    members = B.group_members(links, "query_id", "item_id", 256, cfg.chunk_rows)
    polars_group_s = time.perf_counter() - t3
    dict_group_s, dict_members = python_dict_grouping(events)
    assert dict_members == members.height, (dict_members, members.height)

    rows = built.frame.height
    return {
        "events": events.height, "items": len(items), "rows": rows,
        "rows_by_relation": {k: v.get("rows") for k, v in built.report["relations"].items()},
        "docs_per_row_mean": round(built.frame["doc_ids"].list.len().mean(), 2),
        "leakage_ok": all(r["ok"] for r in built.report["splits"].values()),
        "rejects": rejects.total,
        **{k: round(v, 3) for k, v in timings.items()},
        "grouping_polars_s": round(polars_group_s, 3),
        "grouping_python_dicts_s": round(dict_group_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = make_data(folder, args.events, args.items)
        env = {**os.environ, "POLARS_MAX_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "RAYON_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(folder)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    pipeline_s = res["read_s"] + res["serialize_s"] + res["build_in_context_s"]
    result = {
        "benchmark": "data_recipes in_context corpus",
        "synthetic": shape,
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **res,
        "pipeline_s": round(pipeline_s, 3),
        "child_wall_s": round(wall, 3),
        "rows_per_s": round(res["rows"] / res["build_in_context_s"], 1),
        "events_per_s": round(res["events"] / pipeline_s, 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "grouping_speedup_vs_python_dicts": round(res["grouping_python_dicts_s"] / max(res["grouping_polars_s"], 1e-9), 2),
        "target": {"max_s": 60, "max_rss_mb": 2048},
        "meets_target": pipeline_s <= 60 and peak_rss_mb <= 2048,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "timings on a shared 2-core machine; read_s is the recforge row-validating reader",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"in-context corpus: {res['rows']:,} rows from {res['events']:,} events over {res['items']:,} items")
    print(f"  read {res['read_s']:.1f}s  serialize {res['serialize_s']:.1f}s  build {res['build_in_context_s']:.1f}s"
          f"  -> total {pipeline_s:.1f}s (target <= 60s)")
    print(f"  rows/s (build): {result['rows_per_s']:,.0f}   events/s (end to end): {result['events_per_s']:,.0f}")
    print(f"  peak RSS: {peak_rss_mb:,.0f} MB (target <= 2048)   leakage ok: {res['leakage_ok']}")
    print(f"  co-click grouping, Polars vs Python dicts (same events, same process): "
          f"{res['grouping_polars_s']:.2f}s vs {res['grouping_python_dicts_s']:.2f}s "
          f"= {result['grouping_speedup_vs_python_dicts']}x")
    print(f"written to {args.out}")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
