"""The deterministic book split shared by generate (held-out evaluation) and finetune (training books).

Rule (the one finetune's SFT recipes use, `held_out("book:<id>", eval_percent=20)`): a goodbooks book is
held out when `int(sha256(f"book:{book_id}").hexdigest(), 16) % 100 < 20`, else it is a training book.
It depends on the id alone (not on file order or the sample's size), so every stage and every machine
agrees without sharing a file. About 20% of ids are held out.
"""

from __future__ import annotations

import hashlib

HELD_OUT_PERCENT = 20


def id_hash(text: str, salt: str = "") -> int:
    return int(hashlib.sha256((salt + text).encode("utf-8")).hexdigest(), 16)


def book_split(book_id: str | int, percent: int = HELD_OUT_PERCENT) -> str:
    """"heldout" or "train" for a goodbooks book id (any string id works)."""
    return "heldout" if id_hash(f"book:{book_id}") % 100 < percent else "train"


def shard_of(record_id: str, num_shards: int) -> int:
    """Which of `num_shards` data-parallel shards a record belongs to (salted: independent of the book split)."""
    return id_hash(str(record_id), salt="shard:") % num_shards
