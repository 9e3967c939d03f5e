"""The one train / eval split every stage uses, so a chained pipeline has one evaluation set.

Rule: an entity is held out (`eval`) when

    int(sha256(salt + f"{entity}:{id}").hexdigest(), 16) % 100 < eval_percent[entity]

with `entity` one of `query`, `item`, `user`, `book` (goodbooks books, which generate and finetune
score by) and `doc` (general text, e.g. a replay corpus). The key is typed, so a user and an item that
share an id land independently; the hash is of the id alone, so every machine, process and stage agrees
without sharing a file. `SplitRule()`'s defaults are the project default; a recipe overrides keys in its
`split:` section (`split.salt=v2`, `split.eval_percent.query=30`), and every manifest records the rule
(`RunRecorder` writes `split_rule`). With the defaults, data_recipes' eval queries are exactly align's and
SFT's held-out queries, and data_recipes' eval books exactly the books generate and finetune hold out.

The default salt is empty: the book split then stays the one generate and finetune have always used
(`sha256("book:<id>") % 100 < 20`), so published held-out book ids keep their meaning.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Literal

from pydantic import Field

from recforge.config import RecipeModel

TRAIN, EVAL = "train", "eval"
# The one vocabulary. The rule has two sides, `train` and `eval`; user-facing keys that choose a side (generate's
# `input.split`, `eval tags --split`, align's `eval.eval_on`) call the eval side `heldout`. A stage that needs
# early stopping carves `valid` out of the train side (align: validation queries, CTR: validation users), never
# out of eval; the CTR bridge's `test` users are the eval side.
SIDES = {"heldout": EVAL, "eval": EVAL, "train": TRAIN}
Entity = Literal["query", "item", "user", "book", "doc"]
ENTITIES: tuple[str, ...] = ("query", "item", "user", "book", "doc")


class EvalPercent(RecipeModel):
    """Held-out share per entity type, in whole percent (the hash has 100 buckets)."""

    query: int = Field(20, ge=0, le=100, description="ESCI queries: data_recipes, SFT relevance and align hold out the same ones")
    item: int = Field(20, ge=0, le=100, description="catalogue items (ESCI products, MovieLens anchor movies, distill items)")
    user: int = Field(10, ge=0, le=100, description="users: data_recipes user pairs, the CTR bridge's test users")
    book: int = Field(20, ge=0, le=100, description="goodbooks books: data_recipes, SFT tags, generate and eval tags")
    doc: int = Field(10, ge=0, le=100, description="general-text documents (the replay corpus)")


class SplitRule(RecipeModel):
    """Salt + held-out percentages: the `split:` section every stage's recipe has."""

    salt: str = Field("", description="prefix of every hashed key; change it to draw a new split (every stage at once)")
    eval_percent: EvalPercent = Field(default_factory=EvalPercent)

    @classmethod
    def uniform(cls, percent: int, **keys):
        """The same percent for every entity type (tests, benchmarks: 0 = nothing held out)."""
        return cls(eval_percent=EvalPercent(**{e: percent for e in ENTITIES}), **keys)


DEFAULT_RULE = SplitRule()


def entity_key(entity: str, entity_id: object) -> str:
    """`query:19`, `book:4`: ids are strings everywhere (42 and "42" are the same id)."""
    if entity not in ENTITIES:
        raise ValueError(f"unknown split entity {entity!r}; use one of {ENTITIES}")
    return f"{entity}:{entity_id}"


def stable_hash(text: str) -> int:
    """sha256 of the text as an integer: identical on every machine, Python and library version."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def bucket(entity: str, entity_id: object, rule: SplitRule = DEFAULT_RULE) -> int:
    """0..99 for an entity: below the entity's percent is eval, above is train (CTR uses a second band)."""
    return stable_hash(rule.salt + entity_key(entity, entity_id)) % 100


def percent(entity: str, rule: SplitRule = DEFAULT_RULE) -> int:
    entity_key(entity, "")  # validates the entity
    return getattr(rule.eval_percent, entity)


def is_eval(entity: str, entity_id: object, rule: SplitRule = DEFAULT_RULE) -> bool:
    return bucket(entity, entity_id, rule) < percent(entity, rule)


def split_of(entity: str, entity_id: object, rule: SplitRule = DEFAULT_RULE) -> str:
    """`train` or `eval`."""
    return EVAL if is_eval(entity, entity_id, rule) else TRAIN


def describe(entity: str, rule: SplitRule = DEFAULT_RULE) -> str:
    """The rule in words, for leakage reports: `sha256('' + 'query:<id>') % 100 < 20`."""
    return f"sha256({rule.salt!r} + '{entity}:<id>') % 100 < {percent(entity, rule)}"


def split_frame(ids: Iterable[str], entity: str, rule: SplitRule = DEFAULT_RULE):
    """Polars frame (id, split) over the distinct ids, hashed once per id. Empty input -> an empty frame."""
    import polars as pl

    unique = pl.Series("id", list(ids), dtype=pl.Utf8).unique(maintain_order=True).drop_nulls()
    labels = [split_of(entity, i, rule) for i in unique.to_list()]
    return pl.DataFrame({"id": unique, "split": pl.Series("split", labels, dtype=pl.Utf8)})


def leakage_check(train_ids, eval_ids, unit: str, method: str, split: str | None = None) -> dict:
    """How many eval ids also occur in train rows (0 means no leakage). `split` names the rule used."""
    import polars as pl

    def distinct(ids) -> "pl.Series":
        return (ids if isinstance(ids, pl.Series) else pl.Series("id", list(ids), dtype=pl.Utf8)).unique()

    train, evals = distinct(train_ids), distinct(eval_ids)
    leaked = evals.filter(evals.is_in(train.implode()))
    report = {
        "unit": unit,
        "method": method,
        "train_ids": train.len(),
        "eval_ids": evals.len(),
        "eval_ids_in_train": leaked.len(),
        "leaked_examples": leaked.head(5).to_list(),
        "ok": leaked.len() == 0,
    }
    if split is not None:
        report["split"] = split
    return report


def entity_leakage(train_ids: Iterable[str], eval_ids: Iterable[str], entity: str, rule: SplitRule = DEFAULT_RULE) -> dict:
    """`leakage_check` for ids split by this rule: the report names the rule."""
    return leakage_check(train_ids, eval_ids, f"{entity}_id", "hash", describe(entity, rule))


# KAR's leakage guard (the one setting `generate` and the CTR bridge share): per user, the first
# min((n+1)//2, KAR_MAX_PROMPT_ITEMS) events by time feed prompts / text features only; the rest stay for CTR
# samples, so no generated text ever saw a sample's label.
KAR_MAX_PROMPT_ITEMS = 30


def kar_prefix_length(n: int, max_prompt_items: int = KAR_MAX_PROMPT_ITEMS) -> int:
    """How many of a user's `n` time-ordered events are prompt-only under KAR's leakage guard."""
    return min((n + 1) // 2, max_prompt_items)
