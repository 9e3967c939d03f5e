"""`recforge generate RECIPE --ray --shards N`: the N `--shard i/N` runs as Ray tasks (recforge.ray_executor).

Each task is exactly `recforge generate RECIPE --shard i/N` in a Ray worker: same folder
(`out_dir/shard-IIIII-of-NNNNN`), same seeds, same rows, same exactly-once resume. The driver holds the lock of
`out_dir`, writes `out_dir/progress.json` (the shards' figures summed) and, last, `out_dir/manifest.json`, complete
only when every shard is; `generate-export out_dir` then reads every shard folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recforge.config import RecforgeError
from recforge.generate.generate_config import GenerateConfig
from recforge.shards import ShardSpec


def generate_shard(shard: str, cfg_json: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """One shard in a Ray worker (module level, so workers can import it)."""
    from recforge.generate.runner import run_generate, run_problem

    cfg = GenerateConfig.model_validate(cfg_json)
    try:
        manifest = run_generate(cfg, shard=shard, progress=False, **flags)
    except RecforgeError as err:  # the user's input: every retry would fail the same way
        return {"problem": f"RecforgeError: {err}", "fatal": True}
    problem = run_problem(manifest) or (None if manifest["complete"] else "ended incomplete")
    rows = {o["name"]: o["rows"] for o in manifest["outputs"]}
    return {"problem": problem, "rows": rows["generations"], "failed": rows["failed"],
            "input_rows": manifest["input_rows"], "complete": manifest["complete"], "progress": manifest["progress"]}


def run_generate_on_ray(cfg: GenerateConfig, shards: int, address: str | None = None, num_cpus: int | None = None,
                        cpus_per_shard: float = 1, gpus_per_shard: float | None = None, max_retries: int = 2,
                        force: bool = False, overwrite: bool = False, retry_failed: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """Run every shard on Ray and record the job; returns the job's manifest (see the module doc)."""
    from recforge.generate.runner import GenerationRun
    from recforge.manifest import RunRecorder
    from recforge.ray_executor import init_ray, run_shards, shard_records, stopped_reason
    from recforge.runstate import output_lock

    if shards < 1:
        raise RecforgeError(f"--shards {shards}: need at least 1")
    out = Path(cfg.out_dir)
    specs = [ShardSpec(i, shards) for i in range(shards)]
    with output_lock(out, "generate --ray"):
        if overwrite:  # once, here: a retried shard must resume, never start over
            for spec in specs:
                GenerationRun(cfg, spec).discard_outputs()
        init_ray(address, num_cpus)
        if gpus_per_shard is None:
            gpus_per_shard = default_gpus_per_shard(cfg)
        recorder = RunRecorder(out, "generate --ray", cfg, seed=cfg.seed)
        flags = {"force": force, "retry_failed": retry_failed}
        outcomes = run_shards(
            generate_shard, [f"{s.index}/{s.count}" for s in specs], (cfg.model_dump(mode="json"), flags),
            num_cpus=cpus_per_shard, num_gpus=gpus_per_shard, max_retries=max_retries,
            progress_files=[out / s.folder / "progress.json" for s in specs], progress_out=out / "progress.json",
            show_progress=progress)
        results = [o.result or {} for o in outcomes]
        stopped = stopped_reason(outcomes)
        recorder.add_output("generations", out, rows=sum(r.get("rows") or 0 for r in results), shards=shards)
        recorder.extra.update({
            "executor": {"kind": "ray", "address": address, "cpus_per_shard": cpus_per_shard,
                         "gpus_per_shard": gpus_per_shard, "max_retries": max_retries},
            "shards": shard_records(outcomes, skip=("progress",)),
            "input_rows": sum(r.get("input_rows") or 0 for r in results),
            "complete": stopped is None and all(r.get("complete") for r in results),
            "stopped": stopped,
        })
        return recorder.finish()


def default_gpus_per_shard(cfg: GenerateConfig) -> float:
    """A vLLM shard takes one GPU per tensor-parallel rank where the cluster has GPUs; otherwise none."""
    import ray

    wants_gpu = cfg.engine.kind == "vllm" and cfg.engine.device != "cpu"
    return float(cfg.engine.tensor_parallel_size) if wants_gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
