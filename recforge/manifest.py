"""Run bookkeeping: every run writes `resolved_config.yaml` and `manifest.json` into its output folder.

The manifest records what went in (paths with sha256, row counts), what came out, rejects by
reason, library versions, the git commit, the seed, the number of processes (`world_size`) and the split
rule (`split_rule`: the recipe's `split:` section, or the project default of `recforge.splits` for a run whose
recipe has none), so a run can be audited and reproduced, and a chain of runs checked for one shared evaluation split.

`manifest.json` is also the run's completion marker (`recforge.runstate`): constructing a `RunRecorder` writes it
with `"status": "running"` (and writes `resolved_config.yaml`), `finish()` rewrites it with `"status":
"complete"` as the run's last write. So a recorder is built only once the run's checks have passed (a refused
resume leaves the previous run's files untouched), and whatever a killed run left is never read as finished.

Under `accelerate launch` / `torchrun` every rank builds a recorder, but only the main process writes
(`recforge.distributed`): one `resolved_config.yaml` and one `manifest.json` per run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from recforge.config import dump_config
from recforge.distributed import is_main_process, world_size
from recforge.io import atomic_write_json, atomic_write_text, resolve_path, sha256_file
from recforge.runstate import COMPLETE, RUNNING

TRACKED_PACKAGES = ("recforge", "torch", "transformers", "peft", "trl", "datasets", "sentence-transformers", "vllm")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the recforge checkout in use (None for a non-git install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class RunRecorder:
    """Collects a run's facts and writes them atomically to `manifest.json`.

    Usage: `run = RunRecorder(out_dir, "data", config, seed)`, then `run.add_input(path, rows=...)`,
    `run.add_output(...)`, `run.rejects.update(...)`, `run.extra[...] = ...`, and `run.finish()`.
    `run.main` is False on the other ranks of a multi-process launch: they record but never write.
    """

    def __init__(self, out_dir: str | Path, command: str, config: BaseModel | None, seed: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.config = config
        self.seed = seed
        self.started = time.time()
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.rejects: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self.main = is_main_process()
        if self.main:  # the running marker first: a run cut between the two writes is never taken for finished
            atomic_write_json(self.out_dir / "manifest.json", {"status": RUNNING, **self.header()})
            if config is not None:
                atomic_write_text(self.out_dir / "resolved_config.yaml", dump_config(config))

    def add_input(self, path: str | Path, name: str | None = None, rows: int | None = None) -> None:
        resolved = resolve_path(path)
        entry: dict[str, Any] = {"name": name, "path": str(path), "resolved": str(resolved)}
        if resolved.is_file():
            entry["sha256"] = sha256_file(resolved)
            entry["bytes"] = resolved.stat().st_size
        entry["rows"] = rows
        self.inputs.append(entry)

    def add_output(self, name: str, path: str | Path, rows: int | None = None, **info: Any) -> None:
        self.outputs.append({"name": name, "path": str(path), "rows": rows, **info})

    def split_rule(self) -> dict[str, Any]:
        from recforge.splits import DEFAULT_RULE, SplitRule

        rule = getattr(self.config, "split", None)
        if isinstance(rule, SplitRule):
            return {"source": "recipe", **rule.model_dump(include={"salt", "eval_percent"})}
        return {"source": "project default (recforge.splits)", **DEFAULT_RULE.model_dump()}

    def header(self) -> dict[str, Any]:
        return {"command": self.command, "pid": os.getpid(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))}

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": COMPLETE,
            **self.header(),
            "elapsed_s": round(time.time() - self.started, 3),
            "seed": self.seed,
            "world_size": world_size(),
            "split_rule": self.split_rule(),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "rejects": {"total": sum(self.rejects.values()), "by_reason": dict(sorted(self.rejects.items()))},
            "versions": library_versions(),
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **self.extra,
        }

    def finish(self) -> dict[str, Any]:
        manifest = self.to_dict()
        if self.main:
            atomic_write_json(self.out_dir / "manifest.json", manifest)
        return manifest
