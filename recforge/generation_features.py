"""Generation rows -> the features table's records: tag normalisation, per-entity aggregation and tag voting.

Core (not `recforge.generate`) because align's pseudo-filter aggregates a generate run's pseudo-queries the
way `recforge generate-export` does, and a stage never imports another stage's internals. The table these
records fill is `recforge.records.features_schema()`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Any, Iterable

# Which features column each task fills.
TASK_COLUMN = {
    "interest_tags": "tags",
    "shelf_tags": "tags",
    "notellm_hashtags": "tags",
    "notellm_category": "tags",
    "item_summary": "summary",
    "pseudo_queries": "pseudo_queries",
    "kar_item_knowledge": "knowledge",
    "kar_user_preference": "knowledge",
}


def normalize_tag(tag: str) -> str:
    """`" Science_Fiction "` -> `science-fiction`, `#YA` -> `ya`: NFKC, lowercase, separators to one hyphen."""
    t = unicodedata.normalize("NFKC", str(tag)).strip().lower().lstrip("#")
    t = re.sub(r"[\s_/]+", "-", t)
    t = re.sub(r"-{2,}", "-", t).strip("-")
    return t


def normalize_tags(tags: Iterable[str], taxonomy_map: dict[str, str] | None = None, drop_unmapped: bool = False) -> list[str]:
    """Normalised, mapped through an optional taxonomy (variant -> canonical), de-duplicated, order kept."""
    mapping = {normalize_tag(k): normalize_tag(v) for k, v in (taxonomy_map or {}).items()}
    out: list[str] = []
    for tag in tags:
        t = normalize_tag(tag)
        if not t:
            continue
        if t in mapping:
            t = mapping[t]
        elif drop_unmapped and taxonomy_map:
            continue
        if t not in out:
            out.append(t)
    return out


def tags_of(value: Any) -> list[str]:
    """Tags in a parsed output: a JSON {"tags"|"hashtags": [...]}, or text "a, b, c" (one category = one tag)."""
    if isinstance(value, str):
        return [t for t in value.split(",") if t.strip()]
    if isinstance(value, dict):
        for key in ("tags", "hashtags", "categories"):
            if key in value:
                return list(value[key])
    return []


def knowledge_text(value: Any) -> str:
    """KAR outputs ({"knowledge"|"preferences": [{factor, text}]}) -> one text, "factor: text" per line."""
    if isinstance(value, dict):
        for key in ("knowledge", "preferences"):
            if key in value:
                return "\n".join(f"{e.get('factor', '')}: {e.get('text', '')}".strip() for e in value[key])
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def aggregate(rows: list[dict], taxonomy_map: dict | None = None, drop_unmapped: bool = False, max_tags: int = 10) -> dict[tuple, dict]:
    """Generation rows (of one or more runs) -> one features record per (entity_type, entity_id).

    Tags from several samples or runs are voted: ordered by how many outputs name them, then by first rank.
    """
    votes: dict[tuple, Counter] = defaultdict(Counter)
    first_rank: dict[tuple, dict[str, int]] = defaultdict(dict)
    feats: dict[tuple, dict] = {}
    for row in rows:
        key = (row["entity_type"] or "item", row["id"])
        f = feats.setdefault(key, {"entity_type": key[0], "entity_id": key[1], "tags": [], "summary": None, "pseudo_queries": [], "knowledge": None})
        column = TASK_COLUMN.get(row["task"])
        values = [json.loads(v) for v in (row.get("outputs") or [row["output"]])]
        if column == "tags":
            for v in values:
                for rank, t in enumerate(normalize_tags(tags_of(v), taxonomy_map, drop_unmapped)):
                    votes[key][t] += 1
                    first_rank[key].setdefault(t, len(first_rank[key]) * 100 + rank)
        elif column == "summary":
            f["summary"] = str(values[0])
        elif column == "pseudo_queries":
            seen = list(f["pseudo_queries"])
            for v in values:
                for q in (v.get("queries", []) if isinstance(v, dict) else []):
                    q = " ".join(str(q).split())
                    if q and q.lower() not in {s.lower() for s in seen}:
                        seen.append(q)
            f["pseudo_queries"] = seen
        elif column == "knowledge":
            f["knowledge"] = knowledge_text(values[0])
    for key, counter in votes.items():
        ranked = sorted(counter, key=lambda t: (-counter[t], first_rank[key][t]))
        feats[key]["tags"] = ranked[:max_tags]
    return feats
