"""The one data model every stage shares.

Input records (read from a team's logs and catalogues by `recforge.readers`):
`Item`, `Query`, `Interaction`, `Judgment`. Ids are always strings, so `42` in a CSV and `"42"`
in a JSONL file name the same thing.

Output tables (Parquet, loadable with `datasets.load_dataset("parquet", ...)`):
- corpus rows (`CORPUS_SCHEMA`): one training document group per row, with the boundaries of its
  documents kept, so finetune's packing can isolate documents or connect them on purpose;
- pairs (`PAIRS_SCHEMA`): contrastive pairs for align, carrying the ids needed to mask false negatives;
- features (`FEATURES_SCHEMA`): generated knowledge per item/user id, from generate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union

FieldValue = Union[str, list, int, float]


@dataclass(frozen=True, slots=True)
class Item:
    """A catalogue item: named fields, each text (str), a list of strings, or a number."""

    item_id: str
    fields: dict[str, FieldValue]


@dataclass(frozen=True, slots=True)
class Query:
    query_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Interaction:
    """One behaviour event: a user touched an item (or issued a query) at a time.

    `timestamp` orders a user's events (seconds, or any monotone position such as `seq_pos`).
    `label` is an explicit signal (rating, click 0/1); `weight` scales the event in co-occurrence.
    """

    user_id: str
    item_id: str | None = None
    query_id: str | None = None
    event: str = "click"
    timestamp: float | None = None
    label: float | None = None
    weight: float | None = None
    context: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Judgment:
    """A graded relevance judgment of an item for a query (e.g. ESCI: 3 exact .. 0 irrelevant)."""

    query_id: str
    item_id: str
    grade: float


@dataclass(slots=True)
class CorpusRow:
    """One training row: an ordered group of documents.

    A plain corpus has one document per row. An in-context row (CPRM) holds several related
    documents; `doc_ids` names each one. `text` is the documents joined by the builder's separator.
    """

    row_id: str
    source: str
    documents: list[str]
    doc_ids: list[str]
    text: str = ""
    split: str = "train"
    meta: str = "{}"  # JSON: builder-specific details (group key, relation kind, target field, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Pair:
    """A contrastive pair for align.

    `kind` is one of `query_item`, `item_item`, `user_item`, `user_tag`, ... ; `anchor_positive_ids`
    lists every known positive of the anchor so in-batch negatives that are really positives can be masked.
    """

    pair_id: str
    kind: str
    anchor_id: str
    anchor: str
    positive_id: str
    positive: str
    weight: float = 1.0
    negative_id: str | None = None
    negative: str | None = None
    anchor_positive_ids: list[str] = field(default_factory=list)
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def corpus_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row_id", pa.string()),
            ("source", pa.string()),
            ("documents", pa.list_(pa.string())),
            ("doc_ids", pa.list_(pa.string())),
            ("text", pa.string()),
            ("split", pa.string()),
            ("meta", pa.string()),
        ]
    )


def pairs_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("kind", pa.string()),
            ("anchor_id", pa.string()),
            ("anchor", pa.string()),
            ("positive_id", pa.string()),
            ("positive", pa.string()),
            ("weight", pa.float64()),
            ("negative_id", pa.string()),
            ("negative", pa.string()),
            ("anchor_positive_ids", pa.list_(pa.string())),
            ("split", pa.string()),
        ]
    )


def features_schema():
    """Generated knowledge per entity (generate's export; read by data_recipes `reading`, finetune, align)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("entity_type", pa.string()),  # "item" or "user"
            ("entity_id", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("summary", pa.string()),
            ("pseudo_queries", pa.list_(pa.string())),
            ("knowledge", pa.string()),
        ]
    )
