"""A `recforge generate` run's output shards: their schema, where they lie, and reading them back.

Core (not `recforge.generate`) because other stages read generate runs too (align's pseudo-filter, the CTR
judgement feature) and a stage never imports another stage's internals. `recforge.generate.runner` writes
the shards in `output_schema()`; everything that reads them goes through `read_run_outputs`, which refuses
a broken shard or an unfinished run in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recforge.config import RecforgeError


def output_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("entity_type", pa.string()),
            ("task", pa.string()),
            ("output", pa.string()),  # JSON of the first valid completion's value
            ("outputs", pa.list_(pa.string())),  # JSON of every valid completion (n > 1)
            ("raw", pa.string()),
            ("finish_reason", pa.string()),
            ("attempts", pa.int32()),
            ("seed", pa.int64()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
        ]
    )


def shard_files(out: str | Path) -> list[Path]:
    """One output folder's shards: first-pass parts, then retry shards."""
    d = Path(out) / "shards"
    return sorted(d.glob("part-*.parquet")) + sorted(d.glob("retry-*.parquet"))


def run_shard_files(run_dir: str | Path) -> list[Path]:
    """Every shard of a run: its own, then those of each `shard-*` folder of a data-parallel run."""
    return shard_files(run_dir) + [f for sub in sorted(Path(run_dir).glob("shard-*")) for f in shard_files(sub)]


def read_generations(run_dir: str | Path):
    """All output rows of a run (every shard folder under it too, retry shards included) as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = run_shard_files(run_dir)
    if not files:
        raise RecforgeError(f"{run_dir}: no generation shards (shards/part-*.parquet) found")
    return pa.concat_tables([pq.read_table(f, schema=output_schema()) for f in files])


def read_run_outputs(run_dir: str | Path, allow_partial: bool = False, notes: list[str] | None = None):
    """A generate run's output rows (`read_generations`), after checking every shard opens and has the
    output columns (a broken shard is a one-line error naming it, not a pyarrow traceback) and that the run
    finished (`check_run_finished`; with `allow_partial` its notes are appended to `notes`)."""
    d = Path(run_dir)
    for f in run_shard_files(d):
        check_shard_columns(f)
    found = check_run_finished(d, allow_partial)
    if notes is not None:
        notes.extend(found)
    return read_generations(d)


def check_shard_columns(path: Path) -> None:
    """A shard that does not open, or lacks an output column, is one line naming it."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception as err:  # pyarrow raises several types for a broken or empty file
        raise RecforgeError(f"{path}: not a readable Parquet shard ({type(err).__name__})") from None
    missing = set(output_schema().names) - names
    if missing:
        raise RecforgeError(f"{path}: not a generate output shard, missing columns {sorted(missing)}")


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
