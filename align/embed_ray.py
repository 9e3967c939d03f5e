"""`recforge embed RECIPE --ray --shards N`: the encoding of a catalogue's parts as N Ray tasks (recforge.ray_executor).

Why Ray Core tasks and not Ray Data (as for `generate --ray`, see recforge.ray_executor): the exactly-once
invariant already lives in the part files - each part is written atomically and a part on disk is never encoded
again - so the executor only has to (re)start whole shards, and a restarted shard resumes from its parts on disk.
Ray Data (`map_batches` + a writer) would own the rows and its own idea of what is done, beside plan.json's.

- Plan (driver, under out_dir's lock): exactly `recforge embed`'s plan (`recforge.align.embed.start_embed`):
  one plan.json, one part layout; a changed catalogue or model is refused, `--overwrite` discards the earlier
  outputs once, here (a retried shard must resume, never start over).
- Encode (Ray task per shard i/N): the parts s with s % N == i that are not on disk. The worker derives the work
  from the catalogue and the model itself and checks it against plan.json (`recforge.run_contract.check`: a
  catalogue or model changed while the job ran is refused, never mixed in): same parts, same batches, same vectors as one process, which is this
  with N = 1. A worker that dies is retried by Ray; a shard that raised is resubmitted by the driver.
- Finish (driver): only when every part exists, the exactly-once coverage check, the faiss index and the manifest
  (`complete: true`); otherwise the manifest says `complete: false` and names the shards that kept failing
  (their finished parts are kept: a rerun resumes).
- Progress: each shard writes `progress/shard-IIIII-of-NNNNN.json` (rows_done: items in its finished parts,
  chunks_done / chunks: its parts); the driver sums them into `out_dir/progress.json` and one bar.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from recforge.config import RecforgeError
from recforge.shards import ShardSpec

from .align_config import EmbedConfig

# Fault injection for the tests: a file path. The first worker that finishes a part while the file exists removes
# it and exits at once (os._exit: a worker dying mid-shard, the way a lost node or an OOM kill looks to Ray).
EXIT_AFTER_PART_ENV = "RECFORGE_EMBED_RAY_EXIT_AFTER_PART"


class ShardProgress:
    """One shard's `progress.json`, in the fields `recforge.ray_executor.summed_progress` sums."""

    def __init__(self, path: Path, total_items: int, done_items: int, parts: int, parts_done: int):
        self.path, self.total, self.done, self.parts, self.parts_done = path, total_items, done_items, parts, parts_done
        self.encoded, self.started = 0, time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def part_done(self, part: int, items: int) -> None:
        self.done += items
        self.encoded += items
        self.parts_done += 1
        self.write()

    def write(self) -> None:
        from recforge.io import atomic_write_json

        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.encoded / elapsed
        eta = 0.0 if self.done >= self.total else (round((self.total - self.done) / rate, 1) if rate > 0 else None)
        atomic_write_json(self.path, {"rows_done": self.done, "rows_failed": 0, "completion_tokens": 0,
                                      "chunks_done": self.parts_done, "chunks": self.parts, "elapsed_s": round(elapsed, 3),
                                      "rows_per_s": round(rate, 3), "eta_s": eta})


def _exit_if_asked(part: int, items: int) -> None:
    trigger = os.environ.get(EXIT_AFTER_PART_ENV)
    if not trigger:
        return
    try:
        os.unlink(trigger)  # only one worker can remove it: the fault fires once
    except FileNotFoundError:
        return
    os._exit(17)


def embed_shard(shard: str, cfg_json: dict[str, Any]) -> dict[str, Any]:
    """Encode the parts of one shard ("i/N") in a Ray worker (module level, so workers can import it)."""
    from recforge.readers import RejectLog

    from recforge import run_contract

    from .embed import PLAN, PROGRESS_DIR, encode_parts, items_in, load_plan, part_path, prepare_work, shard_parts

    spec = ShardSpec.parse(shard)
    cfg = EmbedConfig.model_validate(cfg_json)
    out_dir = Path(cfg.out_dir)
    try:
        work = prepare_work(cfg, RejectLog())  # the driver's rejects.jsonl already holds the catalogue's rejects
        recorded = load_plan(out_dir / PLAN)
        if recorded is None:
            raise RecforgeError(f"{out_dir / PLAN}: not found; the driver writes it first")
        problem = run_contract.check(recorded, work.contract, out_dir / PLAN)  # changed while the job ran
        if problem:
            raise RecforgeError(problem)
    except RecforgeError as err:  # the user's input: every retry would fail the same way
        return {"problem": f"RecforgeError: {err}", "fatal": True}
    shard_dir = out_dir / "shards"
    mine = shard_parts(len(work.parts), spec.index, spec.count)
    done = [s for s in mine if part_path(shard_dir, s).is_file()]
    progress = ShardProgress(out_dir / PROGRESS_DIR / f"{spec.folder}.json", items_in(work, mine), items_in(work, done),
                             len(mine), len(done))

    def after_part(part: int, items: int) -> None:
        progress.part_done(part, items)
        _exit_if_asked(part, items)

    encoded = encode_parts(work, shard_dir, mine, cfg.quantize, after_part=after_part)
    missing = [s for s in mine if not part_path(shard_dir, s).is_file()]
    return {"problem": f"parts {missing[:10]} are not on disk after encoding" if missing else None,
            "parts": len(mine), "resumed_parts": len(done), "items": items_in(work, mine), "encoded": encoded,
            "device": str(work.model.device)}


def _absolute(path: str) -> str:
    """A relative path that exists here, made absolute: a Ray worker need not run in the driver's folder."""
    p = Path(path)
    return str(p.resolve()) if not p.is_absolute() and p.exists() else path


def run_embed_on_ray(cfg: EmbedConfig, shards: int, address: str | None = None, num_cpus: int | None = None,
                     cpus_per_shard: float = 1, gpus_per_shard: float | None = None, max_retries: int = 2,
                     overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Plan, encode every shard's parts on Ray, then check and index (see the module doc).

    Returns `recforge.align.embed.run_embed`'s figures plus `complete`, `stopped` and the `manifest`."""
    from recforge.ray_executor import init_ray, run_shards, shard_records, stopped_reason
    from recforge.runstate import output_lock

    from .embed import PROGRESS_DIR, REJECTS, finish_embed, items_in, parts_on_disk, start_embed

    if shards < 1:
        raise RecforgeError(f"--shards {shards}: need at least 1")
    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "embed --ray"):
        staged = out_dir / f".{REJECTS}.partial"
        try:  # the driver only plans: the tokenizer on the CPU, whatever device the workers encode on
            work, run = start_embed(cfg, out_dir, staged, overwrite, command="embed --ray", device="cpu",
                                    compute_dtype="float32")
        finally:
            staged.unlink(missing_ok=True)
        work.model, work.sorted_texts = None, []  # the workers load their own
        shard_dir = out_dir / "shards"
        done_before = parts_on_disk(work, shard_dir)
        shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)  # an earlier job's figures (maybe another N)
        init_ray(address, num_cpus)
        if gpus_per_shard is None:
            gpus_per_shard = default_gpus_per_shard(cfg)
        specs = [ShardSpec(i, shards) for i in range(shards)]
        worker_cfg = cfg.model_copy(update={"out_dir": str(out_dir.resolve()), "model": _absolute(cfg.model),
                                            "catalogue": cfg.catalogue.model_copy(update={"path": _absolute(cfg.catalogue.path)})})
        started = time.perf_counter()
        outcomes = run_shards(
            embed_shard, [f"{s.index}/{s.count}" for s in specs], (worker_cfg.model_dump(mode="json"),),
            num_cpus=cpus_per_shard, num_gpus=gpus_per_shard, max_retries=max_retries,
            progress_files=[out_dir / PROGRESS_DIR / f"{s.folder}.json" for s in specs],
            progress_out=out_dir / "progress.json", show_progress=progress)
        elapsed = time.perf_counter() - started
        done_after = parts_on_disk(work, shard_dir)
        encoded = items_in(work, done_after) - items_in(work, done_before)
        items_per_s = encoded / elapsed if encoded and elapsed > 0 else 0.0
        missing = sorted(set(range(len(work.parts))) - set(done_after))
        stopped = stopped_reason(outcomes) or (f"parts {missing[:10]} of {len(work.parts)} are missing" if missing else None)
        extra = {
            "executor": {"kind": "ray", "address": address, "shards": shards, "cpus_per_shard": cpus_per_shard,
                         "gpus_per_shard": gpus_per_shard, "max_retries": max_retries},
            "shards": shard_records(outcomes),
            "items_per_s": items_per_s, "encoded_this_run": encoded, "resumed_shards": len(done_before),
            "batches": len(work.batches), "sorted_by_tokens": cfg.sort_by_length,
            "complete": stopped is None, "stopped": stopped,
        }
        summary = {"items_per_s": items_per_s, "resumed_shards": len(done_before), "complete": stopped is None,
                   "stopped": stopped}
        if stopped:  # no index over a partial catalogue; the manifest says what is missing
            rows = items_in(work, done_after)
            run.add_output("vectors", shard_dir, rows=rows, quantize=cfg.quantize)
            run.extra.update({**extra, "missing_parts": len(missing)})
            return {"rows": rows, "out_dir": str(out_dir), **summary, "manifest": run.finish()}
        rows, manifest = finish_embed(cfg, out_dir, work, run, extra)
        return {"rows": rows, "out_dir": str(out_dir), **summary, "manifest": manifest}


def default_gpus_per_shard(cfg: EmbedConfig) -> float:
    """One GPU per shard where the cluster has GPUs and the recipe does not ask for the CPU; otherwise none."""
    import ray

    return 1.0 if cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
