"""Run a mass job's `--shard i/N` shards as Ray tasks: one process per shard, retried, one progress line.

Why Ray Core tasks and not Ray Data (`ray.data.llm`): the exactly-once invariant already lives in each shard's
folder (a shard resumes from its finished chunks, `recforge.generate.runner`), so the executor only has to
(re)start whole shards. One Ray task per shard keeps that invariant as it is: a worker that dies mid-shard
is restarted by Ray (`max_retries`, system failures) and the new attempt resumes from the chunks on disk.
Ray Data's LLM stage would own the rows instead, and today one dead engine fails the whole dataset and its
checkpointing is alpha, which is the failure this project must not have.

- Placement: each task asks for `num_cpus` / `num_gpus` (a vLLM shard with tensor parallelism takes that
  many GPUs), so Ray places shards on machines that have them; one engine per task.
- Retries: a worker that dies is retried by Ray; a shard that ends but reports a problem (an engine that kept
  failing, too many failed rows) is resubmitted by the driver, which resumes it. After `max_retries` the job
  ends with exit 1 naming the shard (the other shards' finished work is kept).
- Progress: the driver sums every shard's `progress.json` (rows/s, tokens/s, ETA) into one bar and into
  `out_dir/progress.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recforge.config import RecforgeError

POLL_S = 2.0


@dataclass
class ShardOutcome:
    shard: str
    attempts: int = 0
    result: dict[str, Any] | None = None
    problem: str | None = None
    history: list[str] = field(default_factory=list)


def add_ray_args(parser, what: str, shards_default: int | None, gpus_default: str) -> None:
    """The `--ray` flags every mass job (generate, embed, data) takes, in one group."""
    ray = parser.add_argument_group("Ray executor (pip install 'recforge[ray]')")
    ray.add_argument("--ray", action="store_true", help=f"{what} as --shards N Ray tasks, retried, one progress bar")
    ray.add_argument("--shards", type=int, default=shards_default, help="with --ray: number of shards (default 2)")
    ray.add_argument("--address", help="with --ray: the cluster ('auto' inside a Ray cluster; default: start a local one)")
    ray.add_argument("--cpus-per-shard", type=float, default=1, help="with --ray: CPUs each shard task asks for")
    ray.add_argument("--gpus-per-shard", type=float, default=None,
                     help=f"with --ray: GPUs each shard asks for (default: {gpus_default})")
    ray.add_argument("--max-shard-retries", type=int, default=2,
                     help="with --ray: a shard whose worker died or that ended with a problem is resumed this many times")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`: 'auto', 'ray://host:10001') or start a local one (`num_cpus` there)."""
    try:
        import ray
    except ImportError:
        raise RecforgeError("--ray needs Ray: pip install 'recforge[ray]' (make install adds it)") from None
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)


def summed_progress(progress_files: list[Path], started: float) -> dict[str, Any]:
    """One job's figures from its shards' progress.json files (a missing or torn file counts as no rows yet)."""
    total = {"rows_done": 0, "rows_failed": 0, "completion_tokens": 0, "chunks_done": 0, "chunks": 0}
    etas = []
    for path in progress_files:
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for k in total:
            total[k] += int(p.get(k) or 0)
        if p.get("eta_s") is not None:
            etas.append(float(p["eta_s"]))
    elapsed = max(time.time() - started, 1e-9)
    rows = total["rows_done"] + total["rows_failed"]
    return {**total, "elapsed_s": round(elapsed, 3), "rows_per_s": round(rows / elapsed, 3),
            "tokens_per_s": round(total["completion_tokens"] / elapsed, 1),
            "eta_s": max(etas) if etas else None}  # shards run in parallel: the job ends with its slowest shard


def write_shard_progress(path: Path, rows_done: int, chunks_done: int, chunks: int, rows_failed: int = 0,
                         completion_tokens: int = 0, eta_s: float | None = None) -> None:
    """A shard's progress file, in the fields `summed_progress` sums (for a job whose shards keep no figures
    of their own; written atomically, so the driver never reads a torn one)."""
    from recforge.io import atomic_write_json

    atomic_write_json(path, {"rows_done": rows_done, "rows_failed": rows_failed, "completion_tokens": completion_tokens,
                             "chunks_done": chunks_done, "chunks": chunks, "eta_s": eta_s})


def run_shards(task: Callable[..., dict[str, Any]], shards: list[str], args: tuple, *, num_cpus: float = 1,
               num_gpus: float = 0, max_retries: int = 2, progress_files: list[Path] | None = None,
               progress_out: Path | None = None, show_progress: bool = True) -> list[ShardOutcome]:
    """Run `task(shard, *args)` for every shard spec ("i/N") as a Ray task; returns each shard's outcome.

    `task` returns a dict with a `problem` key (None when the shard finished cleanly); it runs in a worker
    process, so it must be importable there (a module-level function of an installed package).
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False)(task)
    outcomes = {s: ShardOutcome(s) for s in shards}
    running: dict[Any, str] = {}

    def submit(shard: str) -> None:
        outcomes[shard].attempts += 1
        running[remote.remote(shard, *args)] = shard

    for s in shards:
        submit(s)
    started, bar = time.time(), None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(unit="row", desc=f"ray: {len(shards)} shards", file=sys.stderr)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        for ref in ready:
            shard = running.pop(ref)
            outcome = outcomes[shard]
            try:
                outcome.result = ray.get(ref)
                outcome.problem = outcome.result.get("problem")
            except ray.exceptions.RayError as err:  # the worker died past Ray's retries, or the task raised
                outcome.result, outcome.problem = None, one_line(err)
            if outcome.problem:
                outcome.history.append(outcome.problem)
                fatal = bool((outcome.result or {}).get("fatal"))  # bad input: every attempt would fail the same way
                if not fatal and outcome.attempts <= max_retries:
                    submit(shard)  # the shard resumes from its finished chunks
        figures = summed_progress(progress_files or [], started)
        if progress_out is not None:
            from recforge.io import atomic_write_json

            atomic_write_json(progress_out, {**figures, "shards": len(shards),
                                             "shards_done": sum(o.result is not None and not o.problem for o in outcomes.values())})
        if bar is not None:
            bar.n = figures["rows_done"] + figures["rows_failed"]
            bar.set_postfix(rows_s=figures["rows_per_s"], tok_s=figures["tokens_per_s"], eta_s=figures["eta_s"])
            bar.refresh()
    if bar is not None:
        bar.close()
    return [outcomes[s] for s in shards]


def shard_records(outcomes: list[ShardOutcome], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The manifest's `shards` entries: each shard's attempts, last problem, earlier problems and result."""
    return [{"shard": o.shard, "attempts": o.attempts, "problem": o.problem,
             "earlier_problems": o.history[:-1] if o.problem else o.history,
             **{k: v for k, v in (o.result or {}).items() if k not in skip}} for o in outcomes]


def stopped_reason(outcomes: list[ShardOutcome]) -> str | None:
    """One line naming every shard that kept failing (what the job prints with exit 1), or None."""
    return "; ".join(f"shard {o.shard} failed after {o.attempts} attempt(s): {o.problem}"
                     for o in outcomes if o.problem) or None


def one_line(err: BaseException) -> str:
    """The last line of what a Ray error says (its own text carries the remote traceback)."""
    cause = getattr(err, "cause", None)
    text = str(cause) if cause is not None else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(cause or err).__name__}: {lines[-1] if lines else ''}"[:300]
