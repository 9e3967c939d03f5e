"""The one data model every stage shares.

Input records (read from a team's logs and catalogues by `recforge.readers`):
`Item`, `Query`, `Judgment`; behaviour events are read as a Polars frame (`read_interactions`).
Ids are always strings, so `42` in a CSV and `"42"` in a JSONL file name the same thing.

Output tables (Parquet, loadable with `datasets.load_dataset("parquet", ...)`):
- corpus rows (`corpus_schema()`): one training document group per row, with the boundaries of its
  documents kept, so finetune's packing can isolate documents or connect them on purpose;
- pairs (`pairs_schema()`): contrastive pairs for align, carrying the ids needed to mask false negatives;
- features (`features_schema()`): generated knowledge per item/user id, from generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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
class Judgment:
    """A graded relevance judgment of an item for a query (e.g. ESCI: 3 exact .. 0 irrelevant)."""

    query_id: str
    item_id: str
    grade: float


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
