"""Post-processing: normalise tags, aggregate generations per entity, export the shared features table.

The features table (`recforge.records.features_schema()`: entity_type, entity_id, tags, summary,
pseudo_queries, knowledge) is what data_recipes' `reading` builder, finetune's distillation recipe and
align read. Several runs (tags, summaries, queries, knowledge) merge into one row per entity.
"""

from __future__ import annotations

import json
import re
import sys
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
    from recforge.config import read_yaml_file
    from recforge.io import resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise RecforgeError(f"--taxonomy-map: file not found: {path}")
    data = read_yaml_file(p, "taxonomy map")  # bounded: size and alias expansion, one-line errors
    if not isinstance(data, dict):
        raise RecforgeError(f"{path}: a taxonomy map is a YAML/JSON mapping variant -> canonical tag")
    return {str(k): str(v) for k, v in data.items()}


def read_run_outputs(run_dir: str | Path, allow_partial: bool = False, notes: list[str] | None = None):
    """A generate run's output rows (`runner.read_generations`), after checking every shard opens and has the
    output columns (a broken shard is a one-line error naming it, not a pyarrow traceback) and that the run
    finished (`check_run_finished`; with `allow_partial` its notes are appended to `notes`)."""
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
    found = check_run_finished(d, allow_partial)
    if notes is not None:
        notes.extend(found)
    return read_generations(d)


def check_run_finished(run_dir: str | Path, allow_partial: bool = False) -> list[str]:
    """Refuse a generate run that did not finish, in one line naming it; with `allow_partial`, warn and return
    what is unfinished (for the consumer's manifest).

    Every folder holding shards (the run folder, or each `shard-IIIII-of-NNNNN` of a sharded run) needs the
    manifest of a finished run (`recforge.runstate.require_complete`): a folder with shards and no manifest
    was killed before its first manifest write. A sharded run needs all N of its shard folders."""
    from recforge.runstate import read_manifest, require_complete

    d = Path(run_dir)
    notes: list[str] = []

    def unfinished(text: str) -> None:
        if not allow_partial:
            raise RecforgeError(f"{text}; rerun it to completion, or pass --allow-partial to read it as it is")
        print(f"recforge: warning: {text}; read anyway (--allow-partial)", file=sys.stderr)
        notes.append(text)

    shard_dirs = sorted(p for p in d.glob("shard-*-of-*") if p.is_dir())
    for folder in [d, *shard_dirs]:
        if read_manifest(folder) is not None:
            note = require_complete(folder, "generate run", allow_partial)
            notes.extend([note] if note else [])
        elif (folder / "shards").is_dir():
            unfinished(f"generate run {folder} holds shards but no manifest.json (killed before its first manifest write)")
    counts = {int(p.name.rsplit("-", 1)[1]) for p in shard_dirs if p.name.rsplit("-", 1)[1].isdigit()}
    for n in sorted(counts):
        missing = [i for i in range(n) if not (d / f"shard-{i:05d}-of-{n:05d}").is_dir()]
        if missing:
            unfinished(f"generate run {d}: shard folder(s) {missing[:5]} of {n} are missing (not run yet)")
    return notes


def export_features(run_dirs: list[str], out_path: str, taxonomy_map: str | None = None, drop_unmapped: bool = False,
                    max_tags: int = 10, allow_partial: bool = False) -> dict:
    """Read the runs' shards, aggregate per entity, write `features.parquet` (atomic) with a manifest beside it.

    The manifest goes into --out's folder, which this command then owns (its writer lock is held): a folder
    holding another command's manifest, or one of the runs read, is refused. Unfinished runs are refused
    unless `allow_partial` (recorded in the manifest as `partial_inputs`)."""
    from recforge.runstate import output_lock

    out = Path(out_path)
    mapping = load_taxonomy_map(taxonomy_map)  # the arguments first: a bad map fails before any reading
    check_export_folder(out.parent, run_dirs)
    with output_lock(out.parent, "generate-export"):
        check_export_folder(out.parent, run_dirs)  # again under the lock: another command may have just finished there
        return _export_locked(run_dirs, out, mapping, taxonomy_map, drop_unmapped, max_tags, allow_partial)


def check_export_folder(folder: Path, run_dirs: list[str]) -> None:
    """--out's folder must not be a run folder read here, nor hold another command's manifest."""
    from recforge.runstate import read_manifest

    where = folder.resolve()
    if any(where == Path(d).resolve() for d in run_dirs):  # a sharded run's top folder has no manifest of its own
        raise RecforgeError(f"--out {folder}: is a generate run folder read by this export (its manifest.json would be "
                            "replaced); write the features into a folder of their own, e.g. RUN/features/features.parquet")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("command") != "generate-export":
        raise RecforgeError(f"--out {folder}: holds the manifest.json of a `recforge {manifest.get('command')}` run, which "
                            "this export's manifest would replace; write the features into a folder of their own")


def _export_locked(run_dirs, out: Path, mapping, taxonomy_map, drop_unmapped, max_tags, allow_partial) -> dict:
    import pyarrow as pa

    from recforge.io import write_parquet_atomic
    from recforge.manifest import RunRecorder
    from recforge.records import features_schema

    rows: list[dict] = []
    inputs: list[dict] = []
    notes: list[str] = []
    for d in run_dirs:
        table = read_run_outputs(d, allow_partial, notes)
        inputs.append({"name": "run", "path": str(d), "rows": table.num_rows})
        rows.extend(table.to_pylist())
    unknown = sorted({r["task"] for r in rows if r["task"] not in TASK_COLUMN})
    if unknown:
        raise RecforgeError(f"no features column for task(s) {unknown}; known: {sorted(TASK_COLUMN)}")
    feats = aggregate(rows, mapping, drop_unmapped, max_tags)
    records = [feats[k] for k in sorted(feats)]
    recorder = RunRecorder(out.parent, "generate-export", None)  # after the checks: a refused export writes nothing
    recorder.inputs.extend(inputs)
    write_parquet_atomic(pa.Table.from_pylist(records, schema=features_schema()), out)
    recorder.add_output("features", out, rows=len(records))
    recorder.extra["taxonomy_map"] = taxonomy_map
    if notes:
        recorder.extra["partial_inputs"] = notes
    return recorder.finish()
