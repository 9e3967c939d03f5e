"""`recforge data RECIPE --ray --shards N`: the N `--shard i/N` builds as Ray tasks, then the `--merge`, on the driver.

Each task is exactly `recforge data RECIPE --shard i/N` in a Ray worker (recforge.ray_executor): same folder
(`out_dir/shard-IIIII-of-NNNNN`), same rows. Once every shard is complete the driver runs `merge_shards`, the
very `recforge data RECIPE --merge` of the SLURM recipe (array of `--shard i/N` tasks, then `--merge`).

Exactly once: a data shard is all or nothing, so a retried shard starts clean rather than resuming. `run_data`
rebuilds its folder from scratch: the manifest says `running` from the first write to the last, every corpus
file is written under a hidden temporary name and renamed when whole, and each corpus' earlier files (and the
temporaries of a killed attempt) are removed before it is written. A worker killed mid-shard is re-run by Ray
(`max_retries`), taking over its stale lock; the merge reads only the files a finished shard manifest lists. So
no row is in the merged corpora twice and none is missing (tests/test_data_ray.py kills a worker mid-build).

- Driver: holds the lock of `out_dir` while the shards run and writes a `running` manifest there, so nothing
  reads the folder's old corpora as this job's; a job whose shard kept failing leaves that manifest with
  `complete: false` naming the shard (exit 1; the finished shards stay, the next job rebuilds them all). Then
  the lock is released and `merge_shards` takes it again (a process cannot take the same flock twice).
- Workers run in the driver's working directory (restored after), so a relative `out_dir` or input path means
  what it means on the driver (a cluster shares the file system) and each shard's `resolved_config.yaml` is
  the one the merge checks against.
- Progress: each shard writes `out_dir/progress/shard-IIIII-of-NNNNN.json` when it starts and when it ends (a
  shard is one chunk; its rows are its corpora's rows); the driver sums them into `out_dir/progress.json`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from recforge.config import RecforgeError
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.shards import ShardSpec

PROGRESS_DIR = "progress"


@contextlib.contextmanager
def _working_dir(folder: str) -> Iterator[None]:
    """Run in the driver's working directory where this machine has it; the worker's own one afterwards."""
    before = os.getcwd()
    moved = os.path.isdir(folder) and folder != before
    if moved:
        os.chdir(folder)
    try:
        yield
    finally:
        if moved:
            os.chdir(before)


def data_shard(shard: str, cfg_json: dict[str, Any], strict: bool, cwd: str) -> dict[str, Any]:
    """Build one shard ("i/N") in a Ray worker (module level, so workers can import it)."""
    from recforge.data_recipes.build import run_data
    from recforge.ray_executor import write_shard_progress

    spec = ShardSpec.parse(shard)
    cfg = DataRecipe.model_validate(cfg_json)
    with _working_dir(cwd):
        progress = Path(cfg.out_dir) / PROGRESS_DIR / f"{spec.folder}.json"
        write_shard_progress(progress, rows_done=0, chunks_done=0, chunks=1)
        try:
            manifest = run_data(cfg, strict=strict, shard=spec)
        except RecforgeError as err:  # the user's input: every retry would fail the same way
            return {"problem": f"RecforgeError: {err}", "fatal": True}
        rows = {name: sum(info["rows"].values()) for name, info in manifest["corpora"].items()}
        write_shard_progress(progress, rows_done=sum(rows.values()), chunks_done=1, chunks=1)
    # a failed leakage check is no shard failure: the shard is complete and `--merge` reports it (exit 1)
    return {"problem": None, "rows": rows, "leakage_ok": manifest["splits"]["leakage_ok"]}


def stale_shard_folders(out_dir: Path, shards: int) -> list[str]:
    """Shard folders of another shard count, which `--merge` would refuse after every shard had run."""
    keep = {ShardSpec(i, shards).folder for i in range(shards)}
    return sorted(p.name for p in out_dir.glob("shard-*-of-*") if p.name not in keep)


def run_data_on_ray(cfg: DataRecipe, shards: int, strict: bool = False, address: str | None = None,
                    num_cpus: int | None = None, cpus_per_shard: float = 1, gpus_per_shard: float | None = None,
                    max_retries: int = 2, progress: bool = True) -> dict[str, Any]:
    """Build every shard on Ray, then merge them (see the module doc).

    Returns `shards` (each shard's attempts, problem, rows), `stopped` (None, or the shards that kept failing)
    and `manifest`: the merge's manifest, or, when a shard kept failing, the job's `complete: false` one."""
    from recforge.data_recipes.shard_merge import merge_shards
    from recforge.manifest import RunRecorder
    from recforge.ray_executor import init_ray, run_shards, shard_records, stopped_reason
    from recforge.runstate import output_lock

    if shards < 2:
        raise RecforgeError(f"--shards {shards}: need at least 2 (one shard is `recforge data RECIPE` without --ray)")
    out = Path(cfg.out_dir)
    specs = [ShardSpec(i, shards) for i in range(shards)]
    with output_lock(out, "data --ray"):
        stale = stale_shard_folders(out, shards)
        if stale:
            raise RecforgeError(f"{out}: shard folders of another shard count ({', '.join(stale)}); remove them "
                                f"or use another out_dir (--merge would refuse the mix)")
        recorder = RunRecorder(out, "data --ray", cfg, seed=cfg.seed)  # `running` until the merge rewrites it
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # an earlier job's figures (maybe another N)
        init_ray(address, num_cpus)
        outcomes = run_shards(
            data_shard, [f"{s.index}/{s.count}" for s in specs], (cfg.model_dump(mode="json"), strict, os.getcwd()),
            num_cpus=cpus_per_shard, num_gpus=gpus_per_shard or 0, max_retries=max_retries,
            progress_files=[out / PROGRESS_DIR / f"{s.folder}.json" for s in specs],
            progress_out=out / "progress.json", show_progress=progress)
        records, stopped = shard_records(outcomes), stopped_reason(outcomes)
        if stopped:
            recorder.extra.update({
                "executor": {"kind": "ray", "address": address, "cpus_per_shard": cpus_per_shard,
                             "max_retries": max_retries},
                "shards": records, "complete": False, "stopped": stopped})
            return {"shards": records, "stopped": stopped, "manifest": recorder.finish()}
    return {"shards": records, "stopped": None, "manifest": merge_shards(cfg)}
