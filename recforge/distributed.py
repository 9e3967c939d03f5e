"""Which process writes: under `accelerate launch` / `torchrun` every rank runs the same command.

Training is shared (the Trainer shards the data and syncs gradients), but a run's files (model folder,
merged model, export, reports, manifest, rejects) are written by the main process only, as the Trainer's
`is_world_process_zero()` does for `save_model`. The rank is torch.distributed's once a process group is
initialised (the Trainer's TrainingArguments do that), else the `RANK` the launcher exported (torchrun and
`accelerate launch` both export it), so a stage can decide before its Trainer exists; a single process is rank 0.
Other ranks wait at `barrier()` / `from_main()` for what rank 0 writes or computes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TypeVar

T = TypeVar("T")


def _group():
    """torch.distributed when a process group is up, else None (never imports torch: no torch, no group)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (also `accelerate.PartialState().is_main_process` / `trainer.is_world_process_zero()`)."""
    return rank() == 0


def barrier() -> None:
    """Every rank waits here until all arrive (a no-op in a single process or before the group exists)."""
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def from_main(obj: T) -> T | Any:
    """Rank 0's `obj` on every rank (a picklable value; other ranks pass anything). Also a barrier: no rank
    returns before rank 0 got here, i.e. before it finished writing what came before."""
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
