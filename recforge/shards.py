"""Data-parallel shards (`--shard i/N`), the one scheme `recforge generate` and `recforge data` share.

A record or group belongs to shard `sha256("shard:" + id) % N`: salted, so shards are independent of the
project train/eval split (`recforge.splits`), identical on every machine, and N array-job tasks need no
shared state. Each shard writes its own folder `shard-IIIII-of-NNNNN` under the run's `out_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass

from recforge.config import RecforgeError
from recforge.splits import stable_hash

SHARD_SALT = "shard:"


def shard_of(record_id: str, num_shards: int) -> int:
    """Which of `num_shards` shards a record (or group key) belongs to."""
    return stable_hash(SHARD_SALT + str(record_id)) % num_shards


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "ShardSpec":
        if not text:
            return cls()
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise RecforgeError(f"--shard {text!r}: expected i/N, e.g. 0/8") from None
        if n < 1 or not 0 <= i < n:
            raise RecforgeError(f"--shard {text!r}: need 0 <= i < N")
        return cls(i, n)

    @property
    def active(self) -> bool:
        return self.count > 1

    @property
    def folder(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def owns(self, record_id: str) -> bool:
        return not self.active or shard_of(record_id, self.count) == self.index

    def filter(self, frame, column: str):
        """The rows of a Polars frame whose `column` value belongs to this shard (hashed once per distinct value)."""
        import polars as pl

        if not self.active or frame.height == 0:
            return frame
        keys = frame.get_column(column).drop_nulls().unique()
        mine = keys.filter(pl.Series([self.owns(k) for k in keys.cast(pl.Utf8).to_list()], dtype=pl.Boolean))
        return frame.filter(pl.col(column).is_in(mine.implode()))
