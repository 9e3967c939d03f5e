"""Training pairs and held-out retrieval tasks for align.

Three sources, one output: a list of pair dicts in `recforge.records.pairs_schema()` (train split)
plus a `RetrievalTask` (held-out queries, the catalogue, graded qrels).
- `esci`: query -> product judgments; queries split by a hash of query_id so no query is in both splits.
- `pairs`: a pairs Parquet file/folder (e.g. data_recipes' output); rows with split != "train" are held out.
- `movielens`: item <-> item co-engagement from rating sequences (NoteLLM-style I2I), split by anchor item.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import open_text, parquet_files, resolve_path

from .align_config import DataConfig, EsciSource, MovieLensSource


@dataclass
class RetrievalTask:
    """Held-out queries against a catalogue. `qrels[qid][doc_id] = grade` (> 0 is relevant)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, float]]
    name: str = "retrieval"
    relevant_min_grade: float = 1.0
    # Pairs files with several kinds: each query's kind, and the documents a kind ranks (tags for user->tag, ...),
    # so each kind is also scored against its own candidates (`<kind>:ndcg@10`), next to the shared-space ranking.
    query_kind: dict[str, str] = field(default_factory=dict)
    kind_corpus: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class AlignData:
    train_pairs: list[dict]
    task: RetrievalTask
    inputs: list[tuple[str, int]] = field(default_factory=list)  # (path, rows) for the run manifest
    notes: dict = field(default_factory=dict)


def stable_bucket(key: str) -> int:
    """0..99 from a hash of the id: the same id always lands in the same split, on any machine."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecforgeError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise RecforgeError(f"{path}: line {lineno}: expected a JSON object")
            rows.append(row)
    return rows


def _need(row: dict, key: str, path: str, lineno: int):
    if key not in row or row[key] is None:
        raise RecforgeError(f"{path}: row {lineno}: missing field '{key}'")
    return row[key]


def build_esci(src: EsciSource) -> AlignData:
    queries = {str(_need(r, "query_id", src.queries, i)): str(_need(r, "query", src.queries, i))
               for i, r in enumerate(read_jsonl(src.queries), 1)}
    products = {str(_need(r, "product_id", src.products, i)): str(_need(r, "product_title", src.products, i))
                for i, r in enumerate(read_jsonl(src.products), 1)}
    grades: dict[str, dict[str, float]] = defaultdict(dict)
    judgments = read_jsonl(src.judgments)
    for i, r in enumerate(judgments, 1):
        qid, pid = str(_need(r, "query_id", src.judgments, i)), str(_need(r, "product_id", src.judgments, i))
        if qid not in queries or pid not in products:
            continue  # judgment of an unknown query/product: nothing to train or score
        grades[qid][pid] = float(_need(r, "relevance", src.judgments, i))

    train_pairs, qrels = [], {}
    for qid in sorted(grades):
        positives = sorted(p for p, g in grades[qid].items() if g >= src.min_positive_grade)
        if not positives:
            continue
        if stable_bucket(f"query:{qid}") < src.eval_percent:
            qrels[qid] = {p: g for p, g in grades[qid].items() if g > 0}
            continue
        # Judged-irrelevant products are hard negatives: never a known positive of this query.
        negatives = sorted(p for p, g in grades[qid].items() if g == 0)
        for n, pid in enumerate(positives):
            neg = negatives[n % len(negatives)] if negatives else None
            train_pairs.append(
                {
                    "pair_id": f"esci:{qid}:{pid}",
                    "kind": "query_item",
                    "anchor_id": f"query:{qid}",
                    "anchor": queries[qid],
                    "positive_id": pid,
                    "positive": products[pid],
                    "weight": 1.0,
                    "negative_id": neg,
                    "negative": products[neg] if neg else None,
                    "anchor_positive_ids": positives,
                    "split": "train",
                }
            )
    train_pairs += pseudo_query_pairs(products, src.pseudo_queries_per_product, src.pseudo_query_words,
                                      src.pseudo_query_from_first_words)
    task = RetrievalTask(
        queries={q: queries[q] for q in qrels}, corpus=products, qrels=qrels, name="esci",
        relevant_min_grade=src.min_positive_grade,
    )
    inputs = [(src.queries, len(queries)), (src.products, len(products)), (src.judgments, len(judgments))]
    real = [p for p in train_pairs if not p["pair_id"].startswith("ict:")]
    return AlignData(train_pairs, task, inputs, {"train_queries": len({p["anchor_id"] for p in real}),
                                                 "train_query_pairs": len(real), "pseudo_query_pairs": len(train_pairs) - len(real),
                                                 "eval_queries": len(qrels)})


def pseudo_query_pairs(products: dict[str, str], per_product: int, words: tuple[int, int], first_words: int = 12) -> list[dict]:
    """Inverse cloze task: `per_product` spans of `words` words cut from each title, paired with the title.

    Seeded by a hash of the product id (reproducible). Uses catalogue text only, the way a search team has its
    catalogue long before it has judged queries; the held-out queries and their judgments are never read."""
    import random

    pairs = []
    for pid in sorted(products):
        tokens = products[pid].split()[:first_words]
        if len(tokens) < 2:
            continue
        rng = random.Random(stable_bucket(f"pseudo:{pid}") * 1000003 + len(tokens))
        for k in range(per_product):
            n = min(rng.randint(*words), len(tokens) - 1)
            start = rng.randint(0, len(tokens) - n)
            pairs.append({"pair_id": f"ict:{pid}:{k}", "kind": "query_item", "anchor_id": f"pseudo:{pid}:{k}",
                          "anchor": " ".join(tokens[start : start + n]).lower(), "positive_id": pid,
                          "positive": products[pid], "weight": 1.0, "negative_id": None, "negative": None,
                          "anchor_positive_ids": [pid], "split": "train"})
    return pairs


def read_pairs(path: str) -> list[dict]:
    """Rows of a pairs Parquet file or folder, checked against `pairs_schema()` column names."""
    import pyarrow.parquet as pq

    from recforge.records import pairs_schema

    required = {"anchor_id", "anchor", "positive_id", "positive"}
    rows: list[dict] = []
    for f in parquet_files(path, "pairs", recursive=True):
        table = pq.read_table(f)
        missing = required - set(table.column_names)
        if missing:
            raise RecforgeError(f"{f}: not a pairs file, missing columns {sorted(missing)} (see recforge.records.pairs_schema)")
        names = [n for n in pairs_schema().names if n in table.column_names]
        rows.extend(table.select(names).to_pylist())
    for i, r in enumerate(rows):
        r.setdefault("kind", "query_item")
        r.setdefault("split", "train")
        r.setdefault("weight", 1.0)
        r.setdefault("negative_id", None)
        r.setdefault("negative", None)
        r.setdefault("pair_id", f"row{i}")
        r["anchor_positive_ids"] = list(r.get("anchor_positive_ids") or [])
    return rows


def _cap_per_kind(rows: list[dict], cap: int | None) -> list[dict]:
    """At most `cap` rows per kind, chosen by a hash of pair_id (deterministic, spread over anchors)."""
    if not cap:
        return rows
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: hashlib.sha256(str(r["pair_id"]).encode()).hexdigest()):
        if len(by_kind[r["kind"]]) < cap:
            by_kind[r["kind"]].append(r)
    return [r for k in sorted(by_kind) for r in by_kind[k]]


def build_from_pairs(path: str, max_train_per_kind: int | None = None, max_eval_queries_per_kind: int | None = None,
                     kinds: list[str] | None = None) -> AlignData:
    """Train on split == train rows; held-out anchors (keyed `kind:anchor_id`, since a user and an item may share
    an id) are ranked against every positive/negative text in the file (of the kept kinds); their relevant
    documents are the positives of their held-out rows."""
    rows = read_pairs(path)
    if kinds:
        found = {r["kind"] for r in rows}
        if not set(kinds) & found:
            raise RecforgeError(f"{path}: data.kinds={kinds} but the file has kinds {sorted(found)}")
        rows = [r for r in rows if r["kind"] in kinds]
    train = _cap_per_kind([r for r in rows if (r["split"] or "train") == "train"], max_train_per_kind)
    held = [r for r in rows if (r["split"] or "train") != "train"]
    if not held:
        raise RecforgeError(f"{path}: no held-out rows (split != 'train') to evaluate on")
    corpus: dict[str, str] = {}
    for r in rows:
        corpus[str(r["positive_id"])] = r["positive"]
        if r.get("negative_id") and r.get("negative"):
            corpus[str(r["negative_id"])] = r["negative"]
    queries, qrels = {}, defaultdict(dict)
    per_kind: dict[str, set] = defaultdict(set)
    for r in sorted(held, key=lambda r: hashlib.sha256(f"{r['kind']}:{r['anchor_id']}".encode()).hexdigest()):
        qid = f"{r['kind']}:{r['anchor_id']}"
        if max_eval_queries_per_kind and qid not in per_kind[r["kind"]] and len(per_kind[r["kind"]]) >= max_eval_queries_per_kind:
            continue
        per_kind[r["kind"]].add(qid)
        queries[qid] = r["anchor"]
        # Relevant = the positives of the anchor's held-out rows. `anchor_positive_ids` is for masking only: for
        # user -> next item it also lists the books already in the user's history text, and counting those
        # would reward echoing the history instead of predicting the held-out item.
        if str(r["positive_id"]) in corpus:
            qrels[qid][str(r["positive_id"])] = 1.0
    train_keys = {f"{r['kind']}:{r['anchor_id']}" for r in train}
    kind_corpus: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        kind_corpus[r["kind"]].add(str(r["positive_id"]))
        if r.get("negative_id") and r.get("negative"):
            kind_corpus[r["kind"]].add(str(r["negative_id"]))
    query_kind = {q: q.split(":", 1)[0] for q in queries}
    task = RetrievalTask(queries, corpus, dict(qrels), name=Path(path).stem, relevant_min_grade=1.0,
                         query_kind=query_kind if len(per_kind) > 1 else {}, kind_corpus=dict(kind_corpus))
    return AlignData(train, task, [(path, len(rows))], {"eval_anchors_also_in_train": len(train_keys & set(queries)),
                                                        "train_pairs": len(train), "eval_queries": len(queries),
                                                        "train_kinds": dict(sorted({k: sum(r["kind"] == k for r in train) for k in {r["kind"] for r in train}}.items()))})


def _movie_text(row: dict) -> str:
    genres = ", ".join(row.get("genres") or [])
    return f"{row['title']} — {genres}" if genres else str(row["title"])


def build_movielens(src: MovieLensSource) -> AlignData:
    """Item -> item co-engagement (NoteLLM): a user who liked A also liked B within `window` steps.

    Each user's contribution is weighted 1/len(liked items) (NoteLLM's per-user normalisation);
    the top `top_k_per_item` co-engaged items are an item's positives. Anchor items are split by hash.
    """
    root = resolve_path(src.path)
    items_path, seq_path = root / "items.jsonl.gz", root / "sequences.jsonl.gz"
    if not seq_path.is_file() or not items_path.is_file():
        raise RecforgeError(f"MovieLens data not found under {root} (set data.movielens.path=...)")
    items = {str(r["item_id"]): _movie_text(r) for r in read_jsonl(str(items_path))}
    scores: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sequences = read_jsonl(str(seq_path))
    for seq in sequences:
        liked = [str(i) for i, r in zip(seq["item_ids"], seq["ratings"]) if r >= src.min_rating]
        if len(liked) < 2:
            continue
        w = 1.0 / len(liked)
        for a_pos, a in enumerate(liked):
            for b in liked[a_pos + 1 : a_pos + 1 + src.window]:
                if a != b:
                    scores[a][b] += w
                    scores[b][a] += w
    neighbours = {a: [b for b, _ in sorted(nb.items(), key=lambda kv: (-kv[1], kv[0]))[: src.top_k_per_item]]
                  for a, nb in scores.items()}
    train_pairs, qrels = [], {}
    for a in sorted(neighbours):
        if a not in items:
            continue
        pos = [b for b in neighbours[a] if b in items]
        if stable_bucket(f"item:{a}") < src.eval_percent:
            qrels[a] = {b: 1.0 for b in pos}
            continue
        for b in pos[:2]:  # the strongest co-engagements train; all are known positives for masking
            train_pairs.append({"pair_id": f"ml:{a}:{b}", "kind": "item_item", "anchor_id": a, "anchor": items[a],
                                "positive_id": b, "positive": items[b], "weight": 1.0, "negative_id": None,
                                "negative": None, "anchor_positive_ids": pos, "split": "train"})
    train_pairs = sorted(train_pairs, key=lambda p: stable_bucket(p["pair_id"]))[: src.max_train_pairs]
    corpus = {i: t for i, t in items.items()}
    task = RetrievalTask({a: items[a] for a in qrels}, corpus, qrels, name="movielens_i2i")
    return AlignData(train_pairs, task, [(str(items_path), len(items)), (str(seq_path), len(sequences))],
                     {"eval_items": len(qrels), "train_pairs": len(train_pairs)})


def load_align_data(cfg: DataConfig) -> AlignData:
    if cfg.source == "pairs":
        data = build_from_pairs(cfg.pairs_path, cfg.max_train_pairs_per_kind, cfg.max_eval_queries_per_kind, cfg.kinds)
    elif cfg.source == "movielens":
        data = build_movielens(cfg.movielens)
    else:
        data = build_esci(cfg.esci)
    if not data.train_pairs:
        raise RecforgeError("no training pairs: check data paths and splits")
    if cfg.max_train_pairs:
        data.train_pairs = data.train_pairs[: cfg.max_train_pairs]
    return data


def pairs_table(pairs: list[dict]):
    import pyarrow as pa

    from recforge.records import pairs_schema

    schema = pairs_schema()
    return pa.Table.from_pylist([{k: p.get(k) for k in schema.names} for p in pairs], schema=schema)


def ndcg_gain(grade: float) -> float:
    return math.pow(2.0, grade) - 1.0
