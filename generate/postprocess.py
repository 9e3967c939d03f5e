"""Post-processing: normalise tags, aggregate generations per entity, export the shared features table.

The features table (`recforge.records.features_schema()`: entity_type, entity_id, tags, summary,
pseudo_queries, knowledge) is what data_recipes' `reading` builder, finetune's distillation recipe and
align read. Several runs (tags, summaries, queries, knowledge) merge into one row per entity.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from recforge.config import RecforgeError

# Which features column each task fills.
TASK_COLUMN = {
    "interest_tags": "tags",
    "shelf_tags": "tags",
    "notellm_hashtags": "tags",
    "notellm_category": "tags",
    "item_summary": "summary",
    "pseudo_queries": "pseudo_queries",
    "kar_item_knowledge": "knowledge",
    "kar_user_preference": "knowledge",
}


def normalize_tag(tag: str) -> str:
    """`" Science_Fiction "` -> `science-fiction`, `#YA` -> `ya`: NFKC, lowercase, separators to one hyphen."""
    t = unicodedata.normalize("NFKC", str(tag)).strip().lower().lstrip("#")
    t = re.sub(r"[\s_/]+", "-", t)
    t = re.sub(r"-{2,}", "-", t).strip("-")
    return t


def normalize_tags(tags: Iterable[str], taxonomy_map: dict[str, str] | None = None, drop_unmapped: bool = False) -> list[str]:
    """Normalised, mapped through an optional taxonomy (variant -> canonical), de-duplicated, order kept."""
    mapping = {normalize_tag(k): normalize_tag(v) for k, v in (taxonomy_map or {}).items()}
    out: list[str] = []
    for tag in tags:
        t = normalize_tag(tag)
        if not t:
            continue
        if t in mapping:
            t = mapping[t]
        elif drop_unmapped and taxonomy_map:
            continue
        if t not in out:
            out.append(t)
    return out


def tags_of(value: Any) -> list[str]:
    """Tags in a parsed output: a JSON {"tags"|"hashtags": [...]}, or text "a, b, c" (one category = one tag)."""
    if isinstance(value, str):
        return [t for t in value.split(",") if t.strip()]
    if isinstance(value, dict):
        for key in ("tags", "hashtags", "categories"):
            if key in value:
                return list(value[key])
    return []


def knowledge_text(value: Any) -> str:
    """KAR outputs ({"knowledge"|"preferences": [{factor, text}]}) -> one text, "factor: text" per line."""
    if isinstance(value, dict):
        for key in ("knowledge", "preferences"):
            if key in value:
                return "\n".join(f"{e.get('factor', '')}: {e.get('text', '')}".strip() for e in value[key])
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def aggregate(rows: list[dict], taxonomy_map: dict | None = None, drop_unmapped: bool = False, max_tags: int = 10) -> dict[tuple, dict]:
    """Generation rows (of one or more runs) -> one features record per (entity_type, entity_id).

    Tags from several samples or runs are voted: ordered by how many outputs name them, then by first rank.
    """
    votes: dict[tuple, Counter] = defaultdict(Counter)
    first_rank: dict[tuple, dict[str, int]] = defaultdict(dict)
    feats: dict[tuple, dict] = {}
    for row in rows:
        key = (row["entity_type"] or "item", row["id"])
        f = feats.setdefault(key, {"entity_type": key[0], "entity_id": key[1], "tags": [], "summary": None, "pseudo_queries": [], "knowledge": None})
        column = TASK_COLUMN.get(row["task"])
        values = [json.loads(v) for v in (row.get("outputs") or [row["output"]])]
        if column == "tags":
            for v in values:
                for rank, t in enumerate(normalize_tags(tags_of(v), taxonomy_map, drop_unmapped)):
                    votes[key][t] += 1
                    first_rank[key].setdefault(t, len(first_rank[key]) * 100 + rank)
        elif column == "summary":
            f["summary"] = str(values[0])
        elif column == "pseudo_queries":
            seen = list(f["pseudo_queries"])
            for v in values:
                for q in (v.get("queries", []) if isinstance(v, dict) else []):
                    q = " ".join(str(q).split())
                    if q and q.lower() not in {s.lower() for s in seen}:
                        seen.append(q)
            f["pseudo_queries"] = seen
        elif column == "knowledge":
            f["knowledge"] = knowledge_text(values[0])
    for key, counter in votes.items():
        ranked = sorted(counter, key=lambda t: (-counter[t], first_rank[key][t]))
        feats[key]["tags"] = ranked[:max_tags]
    return feats


def load_taxonomy_map(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    import yaml

    from recforge.io import resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise RecforgeError(f"--taxonomy-map: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecforgeError(f"--taxonomy-map: {path}: not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecforgeError(f"{path}: a taxonomy map is a YAML/JSON mapping variant -> canonical tag")
    return {str(k): str(v) for k, v in data.items()}


def read_run_outputs(run_dir: str | Path):
    """A generate run's output rows (`runner.read_generations`), after checking every shard opens and has the
    output columns: a broken shard is a one-line error naming it, not a pyarrow traceback."""
    import pyarrow.parquet as pq

    from recforge.generate.runner import output_schema, read_generations, shard_files

    d = Path(run_dir)
    want = set(output_schema().names)
    for f in shard_files(d) + [f for sub in sorted(d.glob("shard-*")) for f in shard_files(sub)]:
        try:
            names = set(pq.read_schema(f).names)
        except Exception as err:  # pyarrow raises several types for a broken or empty file
            raise RecforgeError(f"{f}: not a readable Parquet shard ({type(err).__name__})") from None
        if not want <= names:
            raise RecforgeError(f"{f}: not a generate output shard, missing columns {sorted(want - names)}")
    return read_generations(d)


def export_features(run_dirs: list[str], out_path: str, taxonomy_map: str | None = None, drop_unmapped: bool = False, max_tags: int = 10) -> dict:
    """Read the runs' shards, aggregate per entity, write `features.parquet` (atomic) with a manifest."""
    import pyarrow as pa

    from recforge.io import write_parquet_atomic
    from recforge.manifest import RunRecorder
    from recforge.records import features_schema

    out = Path(out_path)
    mapping = load_taxonomy_map(taxonomy_map)  # the arguments first: a bad map fails before any reading
    recorder = RunRecorder(out.parent, "generate-export", None)
    rows: list[dict] = []
    for d in run_dirs:
        table = read_run_outputs(d)
        recorder.inputs.append({"name": "run", "path": str(d), "rows": table.num_rows})
        rows.extend(table.to_pylist())
    unknown = sorted({r["task"] for r in rows if r["task"] not in TASK_COLUMN})
    if unknown:
        raise RecforgeError(f"no features column for task(s) {unknown}; known: {sorted(TASK_COLUMN)}")
    feats = aggregate(rows, mapping, drop_unmapped, max_tags)
    records = [feats[k] for k in sorted(feats)]
    write_parquet_atomic(pa.Table.from_pylist(records, schema=features_schema()), out)
    recorder.add_output("features", out, rows=len(records))
    recorder.extra["taxonomy_map"] = taxonomy_map
    return recorder.finish()
