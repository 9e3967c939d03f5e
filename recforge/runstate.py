"""What a run folder says about itself: who writes it now, and whether it finished.

Two contracts every command that writes an output folder keeps (data, cpt, sft, publish, generate,
generate-export, embed, align, eval *):

- **One writer.** `output_lock(out_dir, command)` takes an exclusive `flock` on `out_dir/.recforge.lock`
  before anything is checked or written. A second run on the same folder exits 2 naming the holder (pid,
  command, start time). The kernel drops the lock when its process dies, so a lock left by a killed run
  is stale by construction: the next run takes it over and says so on stderr.
- **Nothing unfinished is read as finished.** `RunRecorder` (recforge.manifest) writes
  `manifest.json` with `"status": "running"` when the run starts writing (after its checks) and with
  `"status": "complete"` as the run's very last write. Consumers call `require_complete(path, what)`:
  it finds the producing run's manifest (the path itself, or a folder above it) and refuses a run that is
  still running, was killed, or says `"complete": false`, with one line naming it. `allow_partial=True`
  (the commands' `--allow-partial`) reads it anyway and returns a note the consumer records.

A third, for the jobs that resume part by part (generate, embed): a resume reads the same input, model and
settings as the run that started the folder (`recforge.run_contract`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from recforge.config import RecforgeError

LOCK_NAME = ".recforge.lock"
MANIFEST = "manifest.json"
RUNNING, COMPLETE = "running", "complete"
# How far above a consumed path its producer's manifest may sit: corpus folder -> run folder, and a shard's
# corpus -> shard folder -> run folder (`runs/data/x/shard-00000-of-00002/items/train-*.parquet`).
MAX_LEVELS_UP = 3


def _holder_text(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')}, "
            f"since {info.get('started_at', '?')})")


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the exclusive writer lock of `out_dir` for the duration of the block (see the module doc).

    On the non-main ranks of a multi-process launch it is a no-op: the ranks of one run share one folder
    and only the main process writes bookkeeping there.
    """
    from recforge.distributed import is_main_process

    out = Path(out_dir)
    if not is_main_process():
        yield out
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecforgeError(f"{out} is being written by another run: {_holder_text(_read_lock(fd))}; "
                                f"wait for it to end or use another out_dir") from None
        previous = _read_lock(fd)
        if previous.get("pid") and not previous.get("released"):
            print(f"recforge: note: took over the stale lock of {out} left by {_holder_text(previous)} "
                  "(that process is gone)", file=sys.stderr)
        _write_lock(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        try:
            yield out
        finally:
            try:
                _write_lock(fd, {**_read_lock(fd), "released": True})
            except OSError:
                pass  # a full disk must not hide the run's own error; the unmarked lock only reads as stale later
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_lock(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode("utf-8"))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A recforge run's manifest in `folder`, or None where there is none (or it is not one of ours)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecforgeError(f"{path}: unreadable run manifest ({type(err).__name__}); the run that wrote it "
                            "did not finish cleanly: rerun it") from None
    return data if isinstance(data, dict) and "command" in data else None


def producer_of(path: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """(run folder, manifest) of the recforge run that wrote `path`, looking at most MAX_LEVELS_UP folders up."""
    p = Path(path).resolve()
    folder = p if p.is_dir() else p.parent
    for _ in range(MAX_LEVELS_UP + 1):
        manifest = read_manifest(folder)
        if manifest is not None:
            return folder, manifest
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def unfinished_reason(manifest: dict[str, Any]) -> str | None:
    """Why a run's manifest does not describe a finished run, or None. Manifests written before the status
    field existed were only ever written at the end of a run, so they count as finished."""
    status = manifest.get("status", COMPLETE)
    if status != COMPLETE:
        return f"status {status!r} (killed or still running)"
    if manifest.get("complete") is False:
        return "it ended incomplete (manifest complete: false)"
    return None


def require_complete(path: str | os.PathLike, what: str, allow_partial: bool = False) -> str | None:
    """Refuse to consume `path` when the recforge run that produced it did not finish (one line naming it).

    Paths no recforge run produced (a user's own files) pass. With `allow_partial` an unfinished producer is
    accepted and the returned note (None otherwise) belongs in the consumer's manifest.
    """
    found = producer_of(path)
    if found is None:
        return None
    folder, manifest = found
    reason = unfinished_reason(manifest)
    if reason is None:
        return None
    text = f"{what} {path} comes from an unfinished `recforge {manifest.get('command', '?')}` run in {folder}: {reason}"
    if not allow_partial:
        raise RecforgeError(f"{text}; rerun it to completion, or pass --allow-partial to read it as it is")
    print(f"recforge: warning: {text}; read anyway (--allow-partial)", file=sys.stderr)
    return text
