"""Post-processing: export the shared features table (tag normalisation and aggregation: `recforge.generation_features`).

The features table (`recforge.records.features_schema()`: entity_type, entity_id, tags, summary,
pseudo_queries, knowledge) is what data_recipes' `reading` builder, finetune's distillation recipe and
align read. Several runs (tags, summaries, queries, knowledge) merge into one row per entity.
"""

from __future__ import annotations

from pathlib import Path

from recforge.config import RecforgeError
# Tag normalisation, aggregation and reading a run back are shared with align (pseudo-filter, CTR judgement), so
# they live in the core; imported from here by generate's own callers (cli, tag_eval).
from recforge.generation_features import TASK_COLUMN, aggregate, normalize_tag, normalize_tags  # noqa: F401
from recforge.generations import read_run_outputs


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
