"""A generation run's figures as it goes: rows done and failed, tokens, rows/s, tokens/s, failure rate and ETA.

`RunProgress.count` adds the rows of each shard written; `progress.json` (what `recforge.ray_executor` sums
over the shards of a Ray job) is rewritten after each, and the bar on stderr follows. `figures()` is also what
the manifest records as `progress`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from recforge.io import atomic_write_json


class RunProgress:
    def __init__(self, path: Path, show: bool, desc: str):
        self.path, self.show, self.desc = path, show, desc
        # prompt_tokens / completion_tokens are added by the run as results come back
        self.stats = {"rows_done": 0, "rows_failed": 0, "completion_tokens": 0, "prompt_tokens": 0}
        self.start, self.rows_todo, self.bar = time.time(), 0, None

    def begin(self, rows_todo: int) -> None:
        """The clock starts: `rows_todo` rows (chunks not done + failed rows to retry) are ahead."""
        self.start, self.rows_todo = time.time(), rows_todo
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=rows_todo, unit="row", desc=self.desc, file=sys.stderr)

    def count(self, n_ok: int, n_failed: int, chunks_done: int, chunks: int) -> None:
        """Add rows written to this run's figures; progress.json and the bar follow."""
        self.stats["rows_done"] += n_ok
        self.stats["rows_failed"] += n_failed
        figures = self.figures()
        atomic_write_json(self.path, {**figures, "chunks_done": chunks_done, "chunks": chunks})
        if self.bar is not None:
            self.bar.update(n_ok + n_failed)
            self.bar.set_postfix(rows_s=f"{figures['rows_per_s']:.1f}", tok_s=f"{figures['tokens_per_s']:.0f}",
                                 fail=f"{figures['failure_rate']:.1%}")

    def figures(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.start, 1e-9)
        rows = self.stats["rows_done"] + self.stats["rows_failed"]
        rate = rows / elapsed
        return {
            **self.stats,
            "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(rate, 3),
            "tokens_per_s": round(self.stats["completion_tokens"] / elapsed, 1),
            "failure_rate": round(self.stats["rows_failed"] / rows, 4) if rows else 0.0,
            "eta_s": round((self.rows_todo - rows) / rate, 1) if rate > 0 else None,
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
