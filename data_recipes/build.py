"""One `recforge data` run: a recipe -> an output folder of corpora (the orchestration; no corpus logic here).

This module reads the recipe's inputs, decides which corpora run (`plan_corpora`), calls each builder in turn
(`iter_corpora`: `catalogue_corpora`, `in_context`, `pair_builders`, `mix`; each turns frames into a `Built`
corpus and knows nothing of files), writes each corpus as soon as it is built (`output_layout.write_corpus`) and
records the manifest. `shard_merge` merges a sharded run.

    out_dir/
      items/train-00000-of-00001.parquet, items/eval-00000-of-00001.parquet
      queries/ query_item/ field_targets/ in_context/ reading/ pairs/ mix/   (the sections that ran)
      rejects.jsonl          malformed input rows, each with file, line and reason
      resolved_config.yaml   the recipe with every default spelled out
      manifest.json          inputs (sha256), row counts, special tokens, split + leakage report,
                             rejects by reason, mix ratios, versions, seed

Load a corpus with `datasets.load_dataset("parquet", data_files={"train": "out_dir/in_context/train-*.parquet"})`.

Sharded (`recforge data RECIPE --shard i/N`, one array-job task each): shard i writes the same layout under
`out_dir/shard-IIIII-of-NNNNN/`, holding the rows whose group key hashes to it (`recforge.shards`, the
scheme `recforge generate --shard` uses): an in-context row's group (query, item, user or anchor item), a
pair's anchor, any other row's first document id. In-context relations drop the other shards' links and
events before grouping, so a shard's rows are exactly the unsharded run's rows of its groups. Then
`recforge data RECIPE --merge` checks that all N shards ran the same recipe, that no row id is in two
shards and that no eval id is in a train row across shards, and writes the merged corpora to `out_dir/`
(`shard_merge.merge_shards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import polars as pl

from recforge.config import RecforgeError
from recforge.data_recipes import in_context
from recforge.data_recipes.catalogue_corpora import (
    build_field_targets,
    build_items,
    build_queries,
    build_query_item,
    build_reading,
    replay_corpus,
)
from recforge.data_recipes.corpus_frames import Built, empty_pairs, split_counts
from recforge.data_recipes.corpus_io import remove_old_shards
from recforge.data_recipes.input_frames import item_text_frame, judgments_frame, query_text_frame
from recforge.data_recipes.lazy_read import read_interactions
from recforge.data_recipes.mix import check_mix_weights, mix_pool, write_mix
from recforge.data_recipes.output_layout import CORPUS_NAMES, SHARD_KEYS, corpus_files, shard_rows, write_corpus
from recforge.data_recipes.pair_builders import (
    build_item_item_pairs,
    build_query_item_pairs,
    build_tag_pairs,
    build_user_item_pairs,
    co_engagement_scores,
)
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.data_recipes.serialize import Serializer, TokenCounter
from recforge.data_recipes.splits import TRAIN
from recforge.features_table import features_table
from recforge.manifest import RunRecorder
from recforge.readers import SourceConfig, read_item_tags, read_items, read_judgments, read_queries
from recforge.rejects import RejectLog
from recforge.runstate import output_lock
from recforge.shards import ShardSpec


def read_features(src: SourceConfig) -> pl.DataFrame:
    """The generate stage's features table (`recforge.features_table.features_table`), the recipe's own column names
    mapped onto the table's, ids as text."""
    rename = {column: field for field, column in src.fields.items() if column != field}
    if src.id and src.id != "entity_id":
        rename[src.id] = "entity_id"
    table = features_table(src.path, "inputs.features.path", src.format, rename)
    return pl.from_arrow(table).with_columns(pl.col("entity_id").cast(pl.Utf8))


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


def check_shardable(cfg: DataRecipe, shard: ShardSpec) -> None:
    if not shard.active:
        return
    if cfg.split.by == "time" and cfg.split.time_cutoff is None:
        raise RecforgeError("--shard with split.by=time needs split.time_cutoff: each shard would otherwise cut at "
                            "the quantile of its own events")


def run_data(cfg: DataRecipe, strict: bool = False, shard: ShardSpec = ShardSpec()) -> dict[str, Any]:
    """Build every enabled corpus of the recipe into `cfg.out_dir` (its shard folder with `shard`); returns the manifest.

    The folder's writer lock is held for the whole run; the recorder (whose `running` manifest marks the folder
    unfinished until `finish()`) is built after the checks and before the first write, so a run killed at any
    point after it - a shard rebuilt in place included - leaves a manifest no consumer takes for finished."""
    out_dir = Path(cfg.out_dir) / shard.folder if shard.active else Path(cfg.out_dir)
    with output_lock(out_dir, "data" + (f" --shard {shard.index}/{shard.count}" if shard.active else "")):
        check_shardable(cfg, shard)
        return _run_data(cfg, strict, shard, out_dir, RunRecorder(out_dir, "data", cfg, cfg.seed))


def _run_data(cfg: DataRecipe, strict: bool, shard: ShardSpec, out_dir: Path, run: RunRecorder) -> dict[str, Any]:
    rejects_path = out_dir / "rejects.jsonl"
    rejects_path.unlink(missing_ok=True)  # per run: a re-run reports (and counts) its own rejects only
    rejects = RejectLog(rejects_path, strict=bool(strict or cfg.strict))
    try:
        inputs = read_inputs(cfg, rejects, run)
    finally:
        rejects.close()
    run.rejects.update(rejects.counts)

    counter = TokenCounter(cfg.token_count)
    serializer = Serializer(cfg.serializer, counter, seed=cfg.seed)
    names, skipped = plan_corpora(cfg, inputs, shard)
    if "mix" in names:  # a mix naming a corpus this run does not build fails here, before anything is written
        check_mix_weights(cfg.mix, mix_pool(dict.fromkeys(names)))

    # each corpus is written as soon as it is built (the in-context one while it is built, a batch at a time),
    # and none is kept: memory holds the inputs and one corpus (or one batch), never every corpus' rows
    corpora, splits = {}, {}
    for name, result in iter_corpora(cfg, inputs, serializer, counter, names, shard):
        if name == "mix":
            corpora[name] = write_mix({n: corpus_files(out_dir, corpora[n], TRAIN) for n in cfg.mix.weights},
                                      out_dir, cfg.mix, cfg.seed, cfg.rows_per_shard)
        else:
            source = result.frame if result.batches is None else result.batches
            corpora[name] = write_corpus(source, out_dir, name, cfg.rows_per_shard, pairs=name == "pairs")
            corpora[name]["report"] = {k: v for k, v in result.report.items() if k not in ("split", "splits")}
        if "split" in result.report:
            splits[name] = result.report["split"]
        for sub, rep in result.report.get("splits", {}).items():
            splits[f"{name}/{sub}"] = rep
        run.add_output(name, out_dir / name, rows=sum(corpora[name]["rows"].values()))
    for name in CORPUS_NAMES:
        if name not in corpora:
            remove_old_shards(out_dir / name)  # a corpus this run skipped must not linger from an earlier run
    if rejects.total:
        run.add_output("rejects", rejects_path, rows=rejects.total)

    run.extra.update(
        shard={"index": shard.index, "count": shard.count, "key": SHARD_KEYS} if shard.active else None,
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


def plan_corpora(cfg: DataRecipe, inp: Inputs, shard: ShardSpec = ShardSpec()) -> tuple[list[str], dict[str, str]]:
    """The corpora this run builds (in build order) and why each other one is skipped (from the recipe and which
    inputs are present: nothing is built yet)."""
    names: list[str] = []
    skipped: dict[str, str] = {}

    def need(name: str, enabled: bool, **required) -> None:
        if not enabled:
            skipped[name] = "disabled in the recipe"
            return
        missing = [k for k, v in required.items() if v is None]
        if missing:
            skipped[name] = "no " + ", ".join(f"inputs.{m}" for m in missing)
            return
        names.append(name)

    need("items", cfg.items.enabled, items=inp.items)
    need("queries", cfg.queries.enabled, queries=inp.queries)
    need("query_item", cfg.query_item.enabled, items=inp.items, queries=inp.queries, judgments=inp.judgments)
    need("field_targets", cfg.field_targets.enabled and bool(cfg.field_targets.tasks), items=inp.items)
    need("in_context", cfg.in_context.enabled, items=inp.items)
    need("reading", cfg.reading.enabled, items=inp.items, features=inp.features)
    need("pairs", cfg.pairs.enabled, items=inp.items)
    if inp.replay is not None:
        names.append("replay")
    if not cfg.mix.enabled:
        skipped["mix"] = "disabled in the recipe"
    elif shard.active:  # its ratios are over whole corpora
        skipped["mix"] = "sharded run: `--merge` builds it from the merged corpora"
    else:
        names.append("mix")
    return names, skipped


def iter_corpora(cfg: DataRecipe, inp: Inputs, serializer: Serializer, counter: TokenCounter, names: list[str],
                 shard: ShardSpec = ShardSpec()) -> Iterator[tuple[str, Built]]:
    """(name, Built) for each planned corpus, one at a time, in `names` order. The in-context corpus is streamed
    (`Built.batches`, built while it is written); the others are frames of the shard's rows. `mix` is yielded
    last with no frame: it is made from the written corpora (`write_mix`)."""
    item_texts = item_text_frame(inp.items, serializer) if inp.items else None
    query_texts = query_text_frame(inp.queries, serializer) if inp.queries else None
    judgments = judgments_frame(inp.judgments) if inp.judgments else None

    def sharded(name: str, result: Built) -> tuple[str, Built]:  # the cheap corpora: built whole, then filtered
        result.frame = shard_rows(name, result.frame, shard)
        return name, result

    if "items" in names:
        yield sharded("items", build_items(inp.items, serializer, cfg.split))
    if "queries" in names:
        yield sharded("queries", build_queries(inp.queries, serializer, cfg.split))
    if "query_item" in names:
        yield sharded("query_item", build_query_item(query_texts, judgments, item_texts, cfg.query_item, cfg.split))
    if "field_targets" in names:
        yield sharded("field_targets", build_field_targets(inp.items, serializer, cfg.field_targets, cfg.split))

    scores, score_report = None, {}
    wants_scores = (cfg.pairs.enabled and cfg.pairs.item_item.enabled) or (
        cfg.in_context.enabled and "co_engaged_items" in cfg.in_context.relations)
    if wants_scores and inp.interactions is not None:
        scores, score_report = co_engagement_scores(inp.interactions, cfg.pairs.item_item, cfg.split,
                                                      cfg.in_context.chunk_rows)

    if "in_context" in names:
        # already the shard's rows: each relation keeps its own groups' links / events before grouping
        yield "in_context", in_context.build_in_context_stream(cfg.in_context, cfg.split, counter, item_texts, query_texts,
                                                      judgments, inp.interactions, scores,
                                                      score_report.get("split"), shard)
    if "reading" in names:
        yield sharded("reading", build_reading(item_texts, inp.features, cfg.reading, cfg.split))
    if "pairs" in names:
        yield sharded("pairs", build_pairs(cfg, inp, item_texts, query_texts, judgments, scores, score_report))
    if "replay" in names:
        # its own corpus too, both splits: CPT replays the train rows and tracks general-text perplexity on the eval rows
        yield sharded("replay", Built(replay_corpus(inp.replay, cfg.split)))
    if "mix" in names:
        yield "mix", Built(None)


def build_pairs(cfg: DataRecipe, inp: Inputs, item_texts, query_texts, judgments, scores, score_report) -> Built:
    p = cfg.pairs
    frames, report, splits = [], {"kinds": {}}, {}

    def add(kind: str, result: Built) -> None:
        frames.append(result.frame)
        report["kinds"][kind] = {"rows": split_counts(result.frame),
                                 **{k: v for k, v in result.report.items() if k != "split" and k not in ("item_tag", "user_tag")}}
        for key in ("split", "item_tag", "user_tag"):
            if key in result.report:
                splits[kind if key == "split" else key] = result.report[key]

    if p.query_item.enabled and inp.queries and inp.judgments:
        add("query_item", build_query_item_pairs(query_texts, judgments, item_texts, p.query_item, cfg.split, cfg.seed))
    if p.item_item.enabled and scores is not None:
        result = build_item_item_pairs(scores, item_texts, score_report.get("split"), cfg.split)
        result.report.update({k: v for k, v in score_report.items() if k != "split"})
        add("item_item", result)
    if p.user_item.enabled and inp.interactions is not None:
        add("user_item", build_user_item_pairs(inp.interactions, inp.items, item_texts, p.user_item, cfg.split))
    if p.tags.enabled and inp.item_tags is not None:
        add("tags", build_tag_pairs(inp.item_tags, item_texts, p.tags, cfg.split, inp.interactions, inp.items,
                                      p.user_item.history_field, p.user_item.history_len))
    frame = pl.concat(frames) if frames else empty_pairs()
    report["splits"] = splits
    return Built(frame, report)
