"""What a generation run reads: the input rows (items, or records with KAR user histories) and the taxonomy.

- `read_records(cfg, rejects_path)`: (id, record) pairs in input order, after `input.split` and `input.limit`,
  through the core's quarantining readers (malformed rows go to rejects.jsonl, never silently dropped).
- KAR histories (`input.history`): each user's rated items as [{title, rating}], cut to the leakage-guarded prefix
  (`recforge.splits.kar_prefix_length`, the one rule the CTR bridge applies too).
- `input_paths(cfg)`: the files whose content the rows depend on, by recipe key (the run contract digests them);
  `unfinished_inputs`: those written by a recforge run must come from a finished one.
"""

from __future__ import annotations

from pathlib import Path

from recforge.generate.generate_config import GenerateConfig
from recforge.io import resolve_path
from recforge.splits import SIDES, kar_prefix_length, split_of


def read_records(cfg: GenerateConfig, rejects_path: Path) -> list[tuple[str, dict]]:
    """(id, record) pairs in input order, after split and limit."""
    inp = cfg.input
    if inp.kind == "items":
        from recforge.readers import RejectLog, SourceConfig, read_items

        src = SourceConfig(path=inp.path, format=inp.format, id=inp.id, fields=inp.fields)
        rejects = RejectLog(path=rejects_path)
        try:
            items = read_items(src, rejects, name="input")
        finally:
            rejects.close()
        pairs = [(it.item_id, {**inp.constants, **it.fields}) for it in items]
    else:
        pairs = _read_jsonl_records(inp, rejects_path)
        if inp.history is not None:
            pairs = _attach_history(pairs, inp.history, rejects_path)
    if inp.split != "all":
        pairs = [(i, r) for i, r in pairs if split_of(inp.entity, i, cfg.split) == SIDES[inp.split]]
    if inp.limit:
        pairs = pairs[: inp.limit]
    return pairs


def _read_jsonl_records(inp, rejects_path: Path) -> list[tuple[str, dict]]:
    """`kind: records` rows through the quarantining reader, in any `input.format`; nested values are kept.

    Malformed rows go to rejects.jsonl with file, line and reason; with `history`, its id / rating columns
    must hold lists (a row where they do not is quarantined, not a crash later)."""
    from recforge.readers import FileKey, RejectLog, SourceConfig, read_records

    h = inp.history
    kinds = {c: "list" for c in ((h.ids_column, h.ratings_column) if h else ()) if c}
    src = SourceConfig(path=inp.path, format=inp.format, id=inp.id, fields=inp.fields)
    with RejectLog(rejects_path) as rejects:
        records = read_records(src, rejects, FileKey("input.path"), kinds)
    return [(rid, {**inp.constants, **rec}) for rid, rec in records]


def _attach_history(pairs, h, rejects_path: Path) -> list[tuple[str, dict]]:
    """Each user's `history` ([{title, rating}], KAR-guarded prefix) from the catalogue at `history.items_path`
    (any format the readers take; its bad rows are quarantined too). Users left with fewer than `min_events`
    known events are rejected as `short_history`."""
    from recforge.readers import FileKey, RejectLog, SourceConfig, read_items

    src = SourceConfig(path=h.items_path, format=h.format, id=h.item_id, fields={"title": h.title_field})
    out = []
    with RejectLog(rejects_path) as rejects:
        titles = {it.item_id: str(it.fields["title"]) for it in read_items(src, rejects, FileKey("input.history.items_path"))}
        for rid, rec in pairs:
            ids = rec.get(h.ids_column) or []
            ratings = rec.get(h.ratings_column) if h.ratings_column else None
            ratings = ratings if isinstance(ratings, list) and len(ratings) == len(ids) else [None] * len(ids)
            keep = kar_prefix_length(len(ids)) if h.kar_prefix else len(ids)
            history = [{"title": titles[str(i)], "rating": r} for i, r in zip(ids[:keep], ratings[:keep]) if titles.get(str(i))]
            if len(history) < h.min_events:
                rejects.reject(None, None, "short_history", f"{len(history)} known events < min_events={h.min_events}",
                               None, "input.history", id=rid)
                continue
            out.append((rid, {**rec, "history": history}))
    return out


def resolve_taxonomy(cfg: GenerateConfig) -> list[str] | None:
    """The tag list a tagging prompt picks from: the recipe's `taxonomy.tags`, or the top training-split book tags."""
    t = cfg.taxonomy
    if t is None:
        return None
    if t.tags:
        return list(t.tags)
    if t.from_book_tags:
        from recforge.generate.tag_eval import top_train_tags

        return top_train_tags(t.from_book_tags, t.top, cfg.split)
    return None


def input_paths(cfg: GenerateConfig) -> dict[str, str]:
    """The input files whose content the rows depend on, by recipe key."""
    inp = cfg.input
    return {"input.path": inp.path, **({"input.history.items_path": inp.history.items_path} if inp.history else {})}


def unfinished_inputs(cfg: GenerateConfig, allow_partial: bool) -> list[str]:
    """Input files written by a recforge run (a data corpus, ...) must come from a finished one."""
    from recforge.runstate import require_complete

    notes = [require_complete(resolve_path(p), k, allow_partial) for k, p in input_paths(cfg).items()
             if resolve_path(p).exists()]
    return [n for n in notes if n]


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)
