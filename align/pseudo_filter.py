"""`recforge pseudo-filter RECIPE`: keep the LLM pseudo-queries whose own item the current embedder retrieves.

Promptagator's round-trip consistency (Dai et al. 2022; also InPars / GPL): `recforge generate` writes k queries
per catalogue item (`prompts/pseudo_queries`); each query is embedded, ranked against the whole catalogue,
and kept only where its item is in the top `top_k`. The kept (query -> item) pairs are written in
`recforge.records.pairs_schema()` so `recforge align` joins them to the real pairs (`data.extra_pairs`, weighted,
with false-negative masking). Inputs are the generated queries and the catalogue: no query or judgment file is read.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recforge.config import RecforgeError
from recforge.io import atomic_write_json, write_parquet_atomic
from recforge.manifest import RunRecorder

from .align_config import PseudoFilterConfig


def read_generated_queries(path: str, allow_partial: bool = False, notes: list | None = None) -> dict[str, list[str]]:
    """item id -> its generated queries (distinct, order kept), from a generate run folder or a features table."""
    from recforge.io import resolve_path

    p = resolve_path(path)
    if p.is_file() and p.suffix == ".parquet":
        from recforge.features_table import read_features_table

        rows = read_features_table(str(p), "pseudo_filter.generated")
        return {str(r["entity_id"]): list(r.get("pseudo_queries") or []) for r in rows if r.get("pseudo_queries")}
    if not p.is_dir():
        raise RecforgeError(f"generated: {path} is neither a generate run folder nor a features Parquet file")
    from recforge.generation_features import aggregate
    from recforge.generations import read_run_outputs

    table = read_run_outputs(p, allow_partial=allow_partial, notes=notes)
    rows = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    rows = [r for r in rows if r.get("task") == "pseudo_queries"]
    if not rows:
        raise RecforgeError(f"generated: {path} holds no pseudo_queries outputs (task: pseudo_queries)")
    feats = aggregate(rows)
    return {str(key[1]): f["pseudo_queries"] for key, f in feats.items() if f["pseudo_queries"]}


def _norm_words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+", text.lower())


def is_title_copy(query: str, title: str) -> bool:
    """The query is the item's title (or its head) given back: same words, in order, covering most of the title."""
    q, t = _norm_words(query), _norm_words(title)
    if not q:
        return True
    return " ".join(q) == " ".join(t) or (" ".join(t).startswith(" ".join(q)) and len(q) >= max(4, 0.75 * len(t)))


def _encode(model, texts: list[str], prompt_name: str | None, batch_size: int) -> np.ndarray:
    from .evaluate import encode_texts

    return encode_texts(model, texts, prompt_name, batch_size)


def consistency_ranks(model, queries: list[str], query_items: list[str], item_ids: list[str], item_texts: list[str],
                      cfg: PseudoFilterConfig) -> list[int]:
    """1-based rank of each query's own item among the catalogue (by the model's cosine similarity)."""
    docs = _encode(model, item_texts, cfg.document_prompt_name, cfg.batch_size)
    vecs = _encode(model, queries, cfg.query_prompt_name, cfg.batch_size)
    col = {pid: j for j, pid in enumerate(item_ids)}
    ranks = []
    for start in range(0, len(queries), 1024):
        scores = vecs[start:start + 1024] @ docs.T
        own = np.array([col[p] for p in query_items[start:start + 1024]])
        own_score = scores[np.arange(len(own)), own][:, None]
        ranks += (1 + (scores > own_score).sum(axis=1)).tolist()
    return ranks


def run_pseudo_filter(cfg: PseudoFilterConfig) -> dict:
    import torch

    from .embed import load_model, read_catalogue

    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    run = RunRecorder(out_dir, "pseudo-filter", cfg, cfg.seed)
    torch.manual_seed(cfg.seed)
    item_ids, item_texts, rejects = read_catalogue(cfg.catalogue)
    run.add_input(cfg.catalogue.path, rows=len(item_ids))
    run.rejects.update(rejects)
    notes: list[str] = []
    generated = read_generated_queries(cfg.generated, cfg.allow_partial, notes)
    run.add_input(cfg.generated, rows=sum(len(v) for v in generated.values()))
    text_of = dict(zip(item_ids, item_texts))
    queries, owners = [], []
    dropped = {"item_not_in_catalogue": 0, "too_short": 0, "too_long": 0, "title_copy": 0, "over_max_per_item": 0}
    for pid in sorted(generated):
        if pid not in text_of:
            dropped["item_not_in_catalogue"] += len(generated[pid])
            continue
        kept_here = 0
        for q in generated[pid]:
            q = " ".join(str(q).split())
            if len(q.split()) < cfg.min_words:
                dropped["too_short"] += 1
                continue
            if cfg.max_words and len(q.split()) > cfg.max_words:
                dropped["too_long"] += 1
                continue
            if cfg.drop_title_copies and is_title_copy(q, text_of[pid]):
                dropped["title_copy"] += 1
                continue
            if cfg.max_queries_per_item and kept_here >= cfg.max_queries_per_item:
                dropped["over_max_per_item"] += 1
                continue
            queries.append(q)
            owners.append(pid)
            kept_here += 1
    if not queries:
        raise RecforgeError(f"generated: no usable pseudo-queries for items of {cfg.catalogue.path}")
    t_read = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, what="model")  # aliases (minilm, smollm2) resolved there
    ranks = consistency_ranks(model, queries, owners, item_ids, item_texts, cfg)
    t_rank = time.perf_counter()
    keep = [cfg.filter == "none" or r <= cfg.top_k for r in ranks]
    pairs = []
    for i, (q, pid, r, k) in enumerate(zip(queries, owners, ranks, keep)):
        if not k:
            continue
        pairs.append({"pair_id": f"pq:{pid}:{i}", "kind": "query_item", "anchor_id": f"pseudo_query:{pid}:{i}",
                      "anchor": q, "positive_id": pid, "positive": text_of[pid], "weight": cfg.weight,
                      "negative_id": None, "negative": None, "anchor_positive_ids": [pid], "split": "train"})
    from .pairs import pairs_table

    write_parquet_atomic(pairs_table(pairs), out_dir / "pairs.parquet")
    ranks_arr = np.array(ranks)
    report = {
        "generated": cfg.generated, "model": cfg.model, "filter": cfg.filter, "top_k": cfg.top_k,
        "items_in_catalogue": len(item_ids), "items_with_queries": len({p for p in generated if p in text_of}),
        "generated_queries": sum(len(v) for v in generated.values()), "scored_queries": len(queries),
        "dropped_before_scoring": dropped, "kept_pairs": len(pairs),
        "kept_share": len(pairs) / len(queries), "items_with_kept_queries": len({p["positive_id"] for p in pairs}),
        "own_item_rank": {"top1": float((ranks_arr <= 1).mean()), "top5": float((ranks_arr <= 5).mean()),
                          "top10": float((ranks_arr <= 10).mean()), "median": float(np.median(ranks_arr))},
        "seconds": {"read": round(t_read - t0, 2), "embed_and_rank": round(t_rank - t_read, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "torch_threads": torch.get_num_threads(), "notes": notes,
    }
    atomic_write_json(out_dir / "filter_report.json", report)
    # every scored query with its rank, for inspection
    import pyarrow as pa

    write_parquet_atomic(pa.table({"item_id": owners, "query": queries, "rank": ranks, "kept": keep}),
                         out_dir / "scored_queries.parquet")
    run.add_output("pairs", out_dir / "pairs.parquet", rows=len(pairs))
    run.add_output("filter_report", out_dir / "filter_report.json")
    run.extra["filter"] = report
    run.finish()
    return report
