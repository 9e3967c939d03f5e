"""Training pairs and held-out retrieval tasks for align.

Three sources, one output: a list of pair dicts in `recforge.records.pairs_schema()` (train split)
plus a `RetrievalTask` (held-out queries, the catalogue, graded qrels).
- `esci`: query -> product judgments; queries split by the project rule (`recforge.splits`), so the held-out
  queries are exactly data_recipes' eval queries and SFT's held-out queries.
- `pairs`: a pairs Parquet file/folder (e.g. data_recipes' output); rows with split != "train" are held out.
- `movielens`: item <-> item co-engagement from rating sequences (NoteLLM-style I2I), split by anchor item.
Files are read through `recforge.readers`: malformed rows go to `rejects.jsonl` (file, line, reason).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import parquet_files, resolve_path
from recforge.esci import read_esci
from recforge.readers import FileKey, RejectLog, SourceConfig, read_records
from recforge.splits import DEFAULT_RULE, SplitRule, entity_leakage, is_eval, leakage_check, stable_hash

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


def build_esci(src: EsciSource, rule: SplitRule = DEFAULT_RULE, rejects: RejectLog | None = None) -> AlignData:
    queries, products, judgments = read_esci((src.queries, src.products, src.judgments),
                                             ("data.esci.queries", "data.esci.products", "data.esci.judgments"),
                                             rejects if rejects is not None else RejectLog())
    grades: dict[str, dict[str, float]] = defaultdict(dict)
    for j in judgments:
        if j.query_id in queries and j.item_id in products:  # else: nothing to train or score
            grades[j.query_id][j.item_id] = float(j.grade)

    train_pairs, qrels = [], {}
    validation = src.eval_on == "validation"
    for qid in sorted(grades):
        positives = sorted(p for p, g in grades[qid].items() if g >= src.min_positive_grade)
        if not positives:
            continue
        if is_eval("query", qid, rule):
            if not validation:  # validation runs never look at held-out queries or their judgments
                qrels[qid] = {p: g for p, g in grades[qid].items() if g > 0}
            continue
        if validation and is_validation(qid, src):
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
        queries={q: queries[q] for q in qrels}, corpus=products, qrels=qrels,
        name="esci_validation" if validation else "esci", relevant_min_grade=src.min_positive_grade,
    )
    inputs = [(src.queries, len(queries)), (src.products, len(products)), (src.judgments, len(judgments))]
    real = [p for p in train_pairs if not p["pair_id"].startswith("ict:")]
    # every held-out query (with or without positives) vs the queries trained on
    held = [q for q in queries if is_eval("query", q, rule)]
    leakage = entity_leakage([p["anchor_id"].split(":", 1)[1] for p in real], held, "query", rule)
    notes = {"train_queries": len({p["anchor_id"] for p in real}), "train_query_pairs": len(real),
             "pseudo_query_pairs": len(train_pairs) - len(real), "eval_queries": len(qrels), "eval_on": src.eval_on,
             "leakage": leakage}
    if validation:
        notes["validation"] = {"queries": len(qrels), "fraction": src.validation_fraction, "salt": src.validation_salt,
                               "from": "training queries only; held-out queries unused",
                               "overlap_with_heldout": sum(is_eval("query", q, rule) for q in qrels)}
    return AlignData(train_pairs, task, inputs, notes)


def is_validation(qid: str, src: EsciSource) -> bool:
    """A training query set aside for model selection (salted hash, independent of the project split)."""
    return stable_hash(f"{src.validation_salt}:{qid}") % 10000 < src.validation_fraction * 10000


def extra_training_pairs(extra, known_ids: set[str] | None = None) -> tuple[list[dict], dict]:
    """Rows of each `data.extra_pairs` file (train split only), weighted; counts for the run manifest."""
    out, counts = [], {}
    for i, src in enumerate(extra):
        rows = [r for r in read_pairs(src.path) if (r.get("split") or "train") == "train"]
        if known_ids is not None:
            rows = [r for r in rows if str(r["positive_id"]) in known_ids]
        rows = sorted(rows, key=lambda r: stable_hash(str(r["pair_id"])))[: src.max_pairs] if src.max_pairs else rows
        for r in rows:
            r["weight"] = float(r.get("weight") or 1.0) * src.weight
            r["pair_id"] = f"extra{i}:{r['pair_id']}"
        counts[src.path] = {"rows": len(rows), "weight": src.weight}
        out += rows
    return out, counts



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
        rng = random.Random(stable_hash(f"pseudo:{pid}") % 100 * 1000003 + len(tokens))
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


def data_manifest_splits(path: str) -> dict:
    """The `splits` section of the `recforge data` manifest that wrote a pairs file/folder ({} if none beside it)."""
    import json

    folder = resolve_path(path)
    for manifest in (folder / "manifest.json", folder.parent / "manifest.json", folder.parent.parent / "manifest.json"):
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("splits") or {}
    return {}


def pairs_leakage(path: str, train: list[dict], held: list[dict]) -> dict:
    """Held-out units of a pairs file vs its train rows. The unit is the anchor (`kind:anchor_id`), or, for a
    kind that recforge data split by event (leave-last-out user -> next item), the anchor's held-out pair."""
    import json

    splits = data_manifest_splits(path)
    by_event = {k.split("/", 1)[1] for k, r in (splits.get("leakage") or {}).items()
                if k.startswith("pairs/") and str(r.get("unit", "")).startswith("event")}

    def unit(r: dict) -> str:
        key = f"{r['kind']}:{r['anchor_id']}"
        return f"{key}>{r['positive_id']}" if r["kind"] in by_event else key

    rule = (f"the split column of {path}, written by recforge data with split {json.dumps(splits['config'], sort_keys=True)}"
            if splits.get("config") else f"the split column of {path} (no recforge data manifest beside it)")
    return leakage_check({unit(r) for r in train}, {unit(r) for r in held}, "kind:anchor_id (event kinds: >positive_id)",
                         "split column", rule)


def _cap_per_kind(rows: list[dict], cap: int | None) -> list[dict]:
    """At most `cap` rows per kind, chosen by a hash of pair_id (deterministic, spread over anchors)."""
    if not cap:
        return rows
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: stable_hash(str(r["pair_id"]))):
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
    for r in sorted(held, key=lambda r: stable_hash(f"{r['kind']}:{r['anchor_id']}")):
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
    leakage = pairs_leakage(path, train, held)
    return AlignData(train, task, [(path, len(rows))], {"leakage": leakage,
                                                        "eval_anchors_also_in_train": len(train_keys & set(queries)),
                                                        "train_pairs": len(train), "eval_queries": len(queries),
                                                        "train_kinds": dict(sorted({k: sum(r["kind"] == k for r in train) for k in {r["kind"] for r in train}}.items()))})


def _movie_text(row: dict) -> str:
    genres = ", ".join(row.get("genres") or [])
    return f"{row['title']} — {genres}" if genres else str(row["title"])


def build_movielens(src: MovieLensSource, rule: SplitRule = DEFAULT_RULE, rejects: RejectLog | None = None) -> AlignData:
    """Item -> item co-engagement (NoteLLM): a user who liked A also liked B within `window` steps.

    Each user's contribution is weighted 1/len(liked items) (NoteLLM's per-user normalisation);
    the top `top_k_per_item` co-engaged items are an item's positives. Anchor items are split by hash.
    """
    root = resolve_path(src.path)
    items_path, seq_path = root / "items.jsonl.gz", root / "sequences.jsonl.gz"
    if not seq_path.is_file() or not items_path.is_file():
        raise RecforgeError(f"MovieLens data not found under {root} (set data.movielens.path=...)")
    rejects = rejects if rejects is not None else RejectLog()
    items = {i: _movie_text(r) for i, r in read_records(SourceConfig(path=str(items_path), id="item_id"), rejects,
                                                          FileKey("data.movielens.path"), {"title": "text", "genres": "list"})}
    scores: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sequences = read_records(SourceConfig(path=str(seq_path), id="user_id"), rejects, FileKey("data.movielens.path"),
                             {"item_ids": "list", "ratings": "list"})
    for _, seq in sequences:
        liked = [str(i) for i, r in zip(seq["item_ids"], seq["ratings"]) if _number(r) >= src.min_rating]
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
        if is_eval("item", a, rule):
            qrels[a] = {b: 1.0 for b in pos}
            continue
        for b in pos[:2]:  # the strongest co-engagements train; all are known positives for masking
            train_pairs.append({"pair_id": f"ml:{a}:{b}", "kind": "item_item", "anchor_id": a, "anchor": items[a],
                                "positive_id": b, "positive": items[b], "weight": 1.0, "negative_id": None,
                                "negative": None, "anchor_positive_ids": pos, "split": "train"})
    train_pairs = sorted(train_pairs, key=lambda p: stable_hash(p["pair_id"]))[: src.max_train_pairs]
    corpus = {i: t for i, t in items.items()}
    task = RetrievalTask({a: items[a] for a in qrels}, corpus, qrels, name="movielens_i2i")
    leakage = entity_leakage([p["anchor_id"] for p in train_pairs], list(qrels), "item", rule)
    return AlignData(train_pairs, task, [(str(items_path), len(items)), (str(seq_path), len(sequences))],
                     {"eval_items": len(qrels), "train_pairs": len(train_pairs), "leakage": leakage})


def _number(value) -> float:
    """A rating; anything that is not a number counts as no rating (never liked)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("-inf")


def load_align_data(cfg: DataConfig, rule: SplitRule = DEFAULT_RULE, rejects: RejectLog | None = None) -> AlignData:
    """Train pairs + the held-out task; built-in sources split by `rule`, a pairs file by its own split column."""
    if cfg.source == "pairs":
        data = build_from_pairs(cfg.pairs_path, cfg.max_train_pairs_per_kind, cfg.max_eval_queries_per_kind, cfg.kinds)
    elif cfg.source == "movielens":
        data = build_movielens(cfg.movielens, rule, rejects)
    else:
        data = build_esci(cfg.esci, rule, rejects)
    if not data.train_pairs:
        raise RecforgeError("no training pairs: check data paths and splits")
    if cfg.max_train_pairs:
        data.train_pairs = data.train_pairs[: cfg.max_train_pairs]
    if cfg.extra_pairs:
        extra, counts = extra_training_pairs(cfg.extra_pairs, set(data.task.corpus))
        data.train_pairs = data.train_pairs + extra
        data.notes["extra_pairs"] = counts
        data.inputs += [(src.path, counts[src.path]["rows"]) for src in cfg.extra_pairs]
    return data


def load_for_run(cfg: DataConfig, rule: SplitRule, run) -> AlignData:
    """`load_align_data` for a run: rejects to `out_dir/rejects.jsonl`, inputs, reject counts and the leakage
    report (naming the split) into the run's manifest."""
    path = run.out_dir / "rejects.jsonl" if run.main else None  # other ranks of a launch count, never write
    if path is not None:
        path.unlink(missing_ok=True)  # a re-run reports its own rejects only
    with RejectLog(path) as rejects:
        data = load_align_data(cfg, rule, rejects)
    run.rejects.update(rejects.counts)
    for input_path, rows in data.inputs:
        run.add_input(input_path, rows=rows)
    run.extra["leakage"] = data.notes.get("leakage")
    return data


def pairs_table(pairs: list[dict]):
    import pyarrow as pa

    from recforge.records import pairs_schema

    schema = pairs_schema()
    return pa.Table.from_pylist([{k: p.get(k) for k in schema.names} for p in pairs], schema=schema)


def ndcg_gain(grade: float) -> float:
    return math.pow(2.0, grade) - 1.0
