"""One `recforge data` run: a recipe -> an output folder of corpora.

    out_dir/
      items/train-00000-of-00001.parquet, items/eval-00000-of-00001.parquet
      queries/ query_item/ field_targets/ in_context/ reading/ pairs/ mix/   (the sections that ran)
      rejects.jsonl          malformed input rows, each with file, line and reason
      resolved_config.yaml   the recipe with every default spelled out
      manifest.json          inputs (sha256), row counts, special tokens, split + leakage report,
                             rejects by reason, mix ratios, versions, seed

Load a corpus with `datasets.load_dataset("parquet", data_files={"train": "out_dir/in_context/train-*.parquet"})`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import polars as pl

from recforge.config import RecforgeError
from recforge.data_recipes import builders as B
from recforge.readers import (
    RejectLog,
    SourceConfig,
    read_interactions,
    read_item_tags,
    read_items,
    read_judgments,
    read_queries,
)
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.data_recipes.serialize import Serializer, TokenCounter
from recforge.data_recipes.splits import EVAL, TRAIN
from recforge.io import resolve_path, write_parquet_shards
from recforge.manifest import RunRecorder
from recforge.records import corpus_schema, pairs_schema

CORPUS_NAMES = ("items", "queries", "query_item", "field_targets", "in_context", "reading", "pairs", "replay", "mix")


def read_features(src: SourceConfig) -> pl.DataFrame:
    """The generate stage's features table (Parquet or JSONL[.gz], `features_schema` columns)."""
    path = resolve_path(src.path)
    if not path.is_file():
        raise RecforgeError(f"inputs.features.path: file not found: {src.path}")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")) or src.format == "parquet":
            frame = pl.read_parquet(path)
        else:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                frame = pl.DataFrame([json.loads(line) for line in f if line.strip()], infer_schema_length=None)
    except (OSError, ValueError, pl.exceptions.PolarsError) as err:
        raise RecforgeError(f"inputs.features.path: cannot read {path}: {err}") from None
    rename = {column: field for field, column in src.fields.items() if column in frame.columns and column != field}
    if src.id and src.id != "entity_id":
        rename[src.id] = "entity_id"
    frame = frame.rename(rename)
    if "entity_id" not in frame.columns:
        raise RecforgeError(f"inputs.features.id: {path} has no entity_id column (columns: {frame.columns})")
    return frame.with_columns(pl.col("entity_id").cast(pl.Utf8))


class Inputs:
    """What the recipe's inputs held after reading (None where not configured)."""

    def __init__(self):
        self.items = self.queries = self.judgments = self.interactions = None
        self.item_tags = self.features = self.replay = None


def read_inputs(cfg: DataRecipe, rejects: RejectLog, run: RunRecorder) -> Inputs:
    got = Inputs()
    src = cfg.inputs
    if src.items:
        got.items = read_items(src.items, rejects, "inputs.items")
        run.add_input(src.items.path, "items", rows=len(got.items))
    if src.queries:
        got.queries = read_queries(src.queries, rejects, "inputs.queries")
        run.add_input(src.queries.path, "queries", rows=len(got.queries))
    if src.judgments:
        got.judgments = read_judgments(src.judgments, rejects, "inputs.judgments")
        run.add_input(src.judgments.path, "judgments", rows=len(got.judgments))
    if src.interactions:
        got.interactions = read_interactions(src.interactions, rejects, "inputs.interactions")
        run.add_input(src.interactions.path, "interactions", rows=got.interactions.height)
    if src.item_tags:
        got.item_tags = read_item_tags(src.item_tags, rejects, "inputs.item_tags")
        run.add_input(src.item_tags.path, "item_tags", rows=got.item_tags.height)
    if src.features:
        got.features = read_features(src.features)
        run.add_input(src.features.path, "features", rows=got.features.height)
    if src.replay:
        got.replay = read_queries(src.replay, rejects, "inputs.replay")
        run.add_input(src.replay.path, "replay", rows=len(got.replay))
    return got


SHARD_RE = re.compile(r"^(train|eval)-\d{5}-of-\d{5}\.parquet$")


def remove_old_shards(folder: Path) -> None:
    """Delete the shards a previous run wrote here (only files named like ours), so no stale rows mix in."""
    if folder.is_dir():
        for old in folder.iterdir():
            if SHARD_RE.match(old.name):
                old.unlink()


def write_corpus(frame: pl.DataFrame, out_dir: Path, name: str, rows_per_shard: int, pairs: bool = False) -> dict[str, Any]:
    """Write one corpus as `<split>-0000i-of-0000n.parquet` shards; old shards of the corpus are removed first."""
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    remove_old_shards(folder)
    schema = pairs_schema() if pairs else corpus_schema()
    columns = B.PAIRS_COLUMNS if pairs else B.CORPUS_COLUMNS
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for split in (TRAIN, EVAL):
        part = frame.filter(pl.col("split") == split).select(list(columns))
        rows[split] = part.height
        if part.height == 0:
            continue
        table = part.to_arrow().cast(schema)
        files[split] = [str(p.relative_to(out_dir)) for p in write_parquet_shards(table, folder, split, rows_per_shard)]
    return {"rows": rows, "files": files, "schema": "pairs" if pairs else "corpus"}


def run_data(cfg: DataRecipe, strict: bool = False) -> dict[str, Any]:
    """Build every enabled corpus of the recipe into `cfg.out_dir`; returns the manifest."""
    out_dir = Path(cfg.out_dir)
    run = RunRecorder(out_dir, "data", cfg, cfg.seed)
    rejects_path = out_dir / "rejects.jsonl"
    if rejects_path.exists():
        rejects_path.unlink()  # a re-run reports its own rejects, not the previous run's too
    rejects = RejectLog(rejects_path, strict=bool(strict or cfg.strict))
    try:
        inputs = read_inputs(cfg, rejects, run)
    finally:
        rejects.close()
    run.rejects.update(rejects.counts)

    counter = TokenCounter(cfg.token_count)
    serializer = Serializer(cfg.serializer, counter, seed=cfg.seed)
    built, skipped = build_corpora(cfg, inputs, serializer, counter)

    for name in CORPUS_NAMES:
        if name not in built:
            remove_old_shards(out_dir / name)  # a corpus this run skipped must not linger from an earlier run
    corpora, splits = {}, {}
    for name, result in built.items():
        corpora[name] = {**write_corpus(result.frame, out_dir, name, cfg.rows_per_shard, pairs=name == "pairs"),
                         "report": {k: v for k, v in result.report.items() if k not in ("split", "splits")}}
        if "split" in result.report:
            splits[name] = result.report["split"]
        for sub, rep in result.report.get("splits", {}).items():
            splits[f"{name}/{sub}"] = rep
        run.add_output(name, out_dir / name, rows=sum(corpora[name]["rows"].values()))
    if rejects.total:
        run.add_output("rejects", rejects_path, rows=rejects.total)

    run.extra.update(
        special_tokens=serializer.special_tokens(),
        corpora=corpora,
        skipped=skipped,
        splits={"config": cfg.split.model_dump(), "leakage": splits,
                "leakage_ok": all(r.get("ok", True) for r in splits.values())},
        reject_notes=dict(rejects.notes),
        load_with='datasets.load_dataset("parquet", data_files={"train": "<out_dir>/<corpus>/train-*.parquet", '
                  '"eval": "<out_dir>/<corpus>/eval-*.parquet"})',
    )
    return run.finish()


def build_corpora(cfg: DataRecipe, inp: Inputs, serializer: Serializer, counter: TokenCounter
                  ) -> tuple[dict[str, B.Built], dict[str, str]]:
    built: dict[str, B.Built] = {}
    skipped: dict[str, str] = {}
    item_texts = B.item_text_frame(inp.items, serializer) if inp.items else None
    query_texts = B.query_text_frame(inp.queries, serializer) if inp.queries else None
    judgments = B.judgments_frame(inp.judgments) if inp.judgments else None

    def need(name: str, enabled: bool, **required) -> bool:
        if not enabled:
            skipped[name] = "disabled in the recipe"
            return False
        missing = [k for k, v in required.items() if v is None]
        if missing:
            skipped[name] = "no " + ", ".join(f"inputs.{m}" for m in missing)
            return False
        return True

    if need("items", cfg.items.enabled, items=inp.items):
        built["items"] = B.build_items(inp.items, serializer, cfg.split)
    if need("queries", cfg.queries.enabled, queries=inp.queries):
        built["queries"] = B.build_queries(inp.queries, serializer, cfg.split)
    if need("query_item", cfg.query_item.enabled, items=inp.items, queries=inp.queries, judgments=inp.judgments):
        built["query_item"] = B.build_query_item(query_texts, judgments, item_texts, cfg.query_item, cfg.split)
    if need("field_targets", cfg.field_targets.enabled and bool(cfg.field_targets.tasks), items=inp.items):
        built["field_targets"] = B.build_field_targets(inp.items, serializer, cfg.field_targets, cfg.split)

    scores, score_report = None, {}
    wants_scores = (cfg.pairs.enabled and cfg.pairs.item_item.enabled) or (
        cfg.in_context.enabled and "co_engaged_items" in cfg.in_context.relations)
    if wants_scores and inp.interactions is not None:
        scores, score_report = B.co_engagement_scores(inp.interactions, cfg.pairs.item_item, cfg.split,
                                                      cfg.in_context.chunk_rows)

    if need("in_context", cfg.in_context.enabled, items=inp.items):
        built["in_context"] = B.build_in_context(cfg.in_context, cfg.split, counter, item_texts, query_texts,
                                                 judgments, inp.interactions, scores, score_report.get("split"))
    if need("reading", cfg.reading.enabled, items=inp.items, features=inp.features):
        built["reading"] = B.build_reading(item_texts, inp.features, cfg.reading, cfg.split)
    if need("pairs", cfg.pairs.enabled, items=inp.items):
        built["pairs"] = build_pairs(cfg, inp, item_texts, query_texts, judgments, scores, score_report)
    if inp.replay is not None:
        # its own corpus too, both splits: CPT replays the train rows and tracks general-text perplexity on the eval rows
        built["replay"] = B.Built(B.replay_corpus(inp.replay, cfg.split))
    if need("mix", cfg.mix.enabled):
        pool = {name: b.frame for name, b in built.items() if name != "pairs"}
        built["mix"] = B.mix_corpora(pool, cfg.mix, cfg.seed)
    return built, skipped


def build_pairs(cfg: DataRecipe, inp: Inputs, item_texts, query_texts, judgments, scores, score_report) -> B.Built:
    p = cfg.pairs
    frames, report, splits = [], {"kinds": {}}, {}

    def add(kind: str, result: B.Built) -> None:
        frames.append(result.frame)
        report["kinds"][kind] = {"rows": B.split_counts(result.frame),
                                 **{k: v for k, v in result.report.items() if k != "split" and k not in ("item_tag", "user_tag")}}
        for key in ("split", "item_tag", "user_tag"):
            if key in result.report:
                splits[kind if key == "split" else key] = result.report[key]

    if p.query_item.enabled and inp.queries and inp.judgments:
        add("query_item", B.build_query_item_pairs(query_texts, judgments, item_texts, p.query_item, cfg.split, cfg.seed))
    if p.item_item.enabled and scores is not None:
        result = B.build_item_item_pairs(scores, item_texts, score_report.get("split"), cfg.split)
        result.report.update({k: v for k, v in score_report.items() if k != "split"})
        add("item_item", result)
    if p.user_item.enabled and inp.interactions is not None:
        add("user_item", B.build_user_item_pairs(inp.interactions, inp.items, item_texts, p.user_item, cfg.split))
    if p.tags.enabled and inp.item_tags is not None:
        add("tags", B.build_tag_pairs(inp.item_tags, item_texts, p.tags, cfg.split, inp.interactions, inp.items,
                                      p.user_item.history_field, p.user_item.history_len))
    frame = pl.concat(frames) if frames else B.empty_pairs()
    report["splits"] = splits
    return B.Built(frame, report)
