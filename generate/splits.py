"""generate's names for the project split (`recforge.splits`) and its data-parallel shards.

A goodbooks book is `heldout` when the project rule holds it out (`sha256("book:<id>") % 100 < 20` with the
default salt and percent): the books finetune's tags SFT never trains on and data_recipes' goodbooks recipe
puts in `eval`, so `recforge eval tags` never scores a book an earlier stage trained on.
"""

from __future__ import annotations

from recforge.splits import DEFAULT_RULE, SplitRule, is_eval, stable_hash


def id_hash(text: str, salt: str = "") -> int:
    return stable_hash(salt + text)


def book_split(book_id: str | int, rule: SplitRule = DEFAULT_RULE) -> str:
    """"heldout" or "train" for a goodbooks book id (any string id works)."""
    return "heldout" if is_eval("book", book_id, rule) else "train"


