"""One `recforge data` run: a recipe -> an output folder of corpora.

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
shards and that no eval id is in a train row across shards, and writes the merged corpora to `out_dir/`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import BaseModel, Field, ValidationError

from recforge.config import RecforgeError, format_validation_error, load_yaml
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
from recforge.runstate import output_lock, read_manifest, unfinished_reason
from recforge.shards import ShardSpec

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
    built, skipped = build_corpora(cfg, inputs, serializer, counter, shard)

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


# The corpora other than in_context are built whole and then filtered, so the reports inside a shard's manifest
# (their leakage checks, pair-kind counts) describe the whole corpus; `corpora.<name>.rows` counts the shard's rows.
SHARD_KEYS = "in_context: the row's group; pairs: anchor_id; other corpora: the first document id"


def shard_rows(name: str, frame: pl.DataFrame, shard: ShardSpec) -> pl.DataFrame:
    """The rows of a built corpus whose group key belongs to `shard` (SHARD_KEYS)."""
    if not shard.active or frame.height == 0:
        return frame
    if name == "pairs":
        key = pl.col("anchor_id")
    elif name == "in_context":
        key = pl.col("meta").str.json_path_match("$.group")
    else:
        key = pl.col("doc_ids").list.first()
    return shard.filter(frame.with_columns(key.alias("_shard_key")), "_shard_key").drop("_shard_key")


def build_corpora(cfg: DataRecipe, inp: Inputs, serializer: Serializer, counter: TokenCounter,
                  shard: ShardSpec = ShardSpec()) -> tuple[dict[str, B.Built], dict[str, str]]:
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
                                                 judgments, inp.interactions, scores, score_report.get("split"), shard)
    if need("reading", cfg.reading.enabled, items=inp.items, features=inp.features):
        built["reading"] = B.build_reading(item_texts, inp.features, cfg.reading, cfg.split)
    if need("pairs", cfg.pairs.enabled, items=inp.items):
        built["pairs"] = build_pairs(cfg, inp, item_texts, query_texts, judgments, scores, score_report)
    if inp.replay is not None:
        # its own corpus too, both splits: CPT replays the train rows and tracks general-text perplexity on the eval rows
        built["replay"] = B.Built(B.replay_corpus(inp.replay, cfg.split))
    for name, result in built.items():  # the corpora other than in_context are cheap: built whole, then filtered
        result.frame = shard_rows(name, result.frame, shard)
    if need("mix", cfg.mix.enabled):
        if shard.active:  # its ratios are over whole corpora
            skipped["mix"] = "sharded run: `--merge` builds it from the merged corpora"
        else:
            built["mix"] = B.mix_corpora(mix_pool({n: b.frame for n, b in built.items()}), cfg.mix, cfg.seed)
    return built, skipped


def mix_pool(corpora: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """The corpora mix samples from: all but the pairs (another schema) and an earlier mix."""
    return {name: frame for name, frame in corpora.items() if name not in ("pairs", "mix")}


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


def shard_folders(out_dir: Path) -> list[tuple[ShardSpec, Path]]:
    """All N `shard-IIIII-of-NNNNN` folders of one sharded run; a missing, unfinished or mixed-N set is an error."""
    found = sorted(out_dir.glob("shard-*-of-*"))
    if not found:
        raise RecforgeError(f"{out_dir}: no shard-IIIII-of-NNNNN folders to merge (run `recforge data RECIPE --shard i/N` first)")
    counts = {f.name.rsplit("-of-", 1)[1] for f in found}
    if len(counts) != 1 or not next(iter(counts)).isdigit():
        raise RecforgeError(f"{out_dir}: shard folders of different shard counts ({', '.join(sorted(counts))}); remove the stale ones")
    n = int(counts.pop())
    shards = [ShardSpec(i, n) for i in range(n)]
    missing = [s.folder for s in shards if not (out_dir / s.folder / "manifest.json").is_file()]
    if missing:
        raise RecforgeError(f"{out_dir}: shard(s) not finished (no manifest.json): {', '.join(missing)}")
    return [(s, out_dir / s.folder) for s in shards]


class _ShardInfo(BaseModel):
    index: int
    count: int


class _ShardCorpus(BaseModel):
    files: dict[str, list[str]] = Field(default_factory=dict)


class _ShardSplits(BaseModel):
    leakage: dict[str, dict[str, Any]]


class ShardManifest(BaseModel):
    """The parts of a shard's manifest.json that `--merge` reads (anything else in it is ignored)."""

    command: Literal["data"]
    shard: _ShardInfo
    corpora: dict[str, _ShardCorpus]
    splits: _ShardSplits
    special_tokens: list[str]
    rejects: dict[str, Any]


def read_shard(spec: ShardSpec, folder: Path, recipe: dict) -> dict[str, Any]:
    """A shard's manifest, once it is known to be finished, of the right shape and of this recipe; else one line
    naming the shard (a shard rebuilt in place and killed, or a hand-edited manifest, is never merged)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise RecforgeError(f"{folder}/manifest.json: not a recforge run manifest; rerun this shard")
    reason = unfinished_reason(manifest)
    if reason is not None:
        raise RecforgeError(f"{folder}: shard not finished ({reason}); rerun `recforge data RECIPE --shard "
                            f"{spec.index}/{spec.count}` to completion before --merge")
    try:
        ShardManifest.model_validate(manifest)
    except ValidationError as err:
        raise RecforgeError(format_validation_error(err, f"{folder}/manifest.json (not a data shard manifest)")) from None
    if (manifest["shard"]["index"], manifest["shard"]["count"]) != (spec.index, spec.count):
        raise RecforgeError(f"{folder}/manifest.json: written by shard {manifest['shard']['index']}/"
                            f"{manifest['shard']['count']}, not {spec.index}/{spec.count}; rerun this shard")
    config = folder / "resolved_config.yaml"
    try:
        same = load_yaml(config.read_text(encoding="utf-8"), str(config)) == recipe
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RecforgeError(f"{config}: unreadable ({type(err).__name__}); rerun this shard") from None
    if not same:
        raise RecforgeError(f"{config}: this shard ran a different recipe than {folder.parent}'s; "
                            "rerun it or merge with the recipe and overrides it was built with")
    return manifest


def read_shard_corpus(name: str, spec: ShardSpec, folder: Path, manifest: dict) -> pl.DataFrame | None:
    """A shard's rows of one corpus (the files its manifest lists, inside the shard folder), checked to be its own."""
    info = manifest["corpora"].get(name) or {}
    files = [folder / f for split_files in info.get("files", {}).values() for f in split_files]
    if not files:
        return None
    for f in files:
        if not f.resolve().is_relative_to(folder.resolve()) or not f.is_file():
            raise RecforgeError(f"{folder}/manifest.json: corpus {name} lists {f}, not a file of this shard; rerun this shard")
    try:
        frame = pl.read_parquet(files)
        wrong = frame.height - shard_rows(name, frame, spec).height
    except (OSError, pl.exceptions.PolarsError) as err:
        raise RecforgeError(f"{folder}/{name}: unreadable shard corpus ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160] if str(err) else ''}); rerun this shard") from None
    if wrong:
        raise RecforgeError(f"{folder}/{name}: {wrong} rows whose group key belongs to another shard")
    return frame.with_columns(pl.lit(spec.index).alias("_shard"))


def merge_shards(cfg: DataRecipe) -> dict[str, Any]:
    """`recforge data RECIPE --merge`: the shards' corpora -> `out_dir/<corpus>/`, checked across shards.

    The mix corpus, whose ratios are over whole corpora, is built here from the merged ones.
    Checks: every shard finished (its manifest says complete) and ran this recipe (its resolved_config.yaml),
    no row id is in two shards, every row sits in the shard its group key hashes to, every shard's own leakage
    check passed, and, recomputed on the merged rows, no eval id in a train row for the checks that are over row
    document ids. The merge holds the lock of `out_dir` and of every shard folder: no shard is rebuilt under it.
    """
    from recforge.config import dump_config

    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "data --merge"), contextlib.ExitStack() as held:
        shards = shard_folders(out_dir)
        for _, folder in shards:
            held.enter_context(output_lock(folder, "data --merge (reading this shard)"))
        recipe = yaml.safe_load(dump_config(cfg))
        manifests = [read_shard(spec, folder, recipe) for spec, folder in shards]
        return _merge(cfg, out_dir, shards, manifests, RunRecorder(out_dir, "data merge", cfg, cfg.seed))


def _merge(cfg: DataRecipe, out_dir: Path, shards: list[tuple[ShardSpec, Path]], manifests: list[dict],
           run: RunRecorder) -> dict[str, Any]:
    (out_dir / "rejects.jsonl").unlink(missing_ok=True)  # the shards' rejects stay in their folders
    frames, corpora, leakage = {}, {}, {}
    for name in CORPUS_NAMES:
        parts = [p for (spec, folder), manifest in zip(shards, manifests)
                 if (p := read_shard_corpus(name, spec, folder, manifest)) is not None]
        if not parts:
            remove_old_shards(out_dir / name)
            continue
        try:
            merged = pl.concat(parts, how="vertical_relaxed")
        except pl.exceptions.PolarsError as err:
            raise RecforgeError(f"{name}: the shards' corpora do not share one schema ({type(err).__name__}); "
                                "rerun the shards with one recforge version") from None
        id_col = "pair_id" if name == "pairs" else "row_id"
        dup = merged.group_by(id_col).agg(pl.col("_shard").unique().sort()).filter(pl.col("_shard").list.len() > 1)
        if dup.height:
            rid, where = dup.row(0)
            raise RecforgeError(f"{name}: row {rid!r} is in shards {where} ({dup.height} such rows)")
        frames[name] = merged.drop("_shard")
        leakage.update(cross_shard_leakage(name, frames[name], manifests))
    if cfg.mix.enabled:
        mix = B.mix_corpora(mix_pool(frames), cfg.mix, cfg.seed)
        frames["mix"] = mix.frame
    for name, frame in frames.items():
        corpora[name] = write_corpus(frame, out_dir, name, cfg.rows_per_shard, pairs=name == "pairs")
        run.add_output(name, out_dir / name, rows=sum(corpora[name]["rows"].values()))
    if cfg.mix.enabled:
        corpora["mix"]["report"] = mix.report
    failed = {f"shard {m['shard']['index']}: {k}": v for m in manifests
              for k, v in m["splits"]["leakage"].items() if not v.get("ok", True)}
    run.extra.update(
        merged_from=[str(folder) for _, folder in shards],
        shard={"count": len(shards), "key": SHARD_KEYS},
        corpora=corpora,
        special_tokens=manifests[0]["special_tokens"],
        rejects_by_shard=[m["rejects"] for m in manifests],
        splits={"config": cfg.split.model_dump(), "per_shard_failures": failed, "cross_shard": leakage,
                "leakage_ok": not failed and all(r["ok"] for r in leakage.values())},
    )
    return run.finish()


# the leakage checks `build_corpora` computes over each row's doc_ids (the others are over anchors or events)
DOC_ID_CHECKS = ("items", "queries", "field_targets", "in_context/items_by_query", "in_context/queries_by_item")


def cross_shard_leakage(name: str, merged: pl.DataFrame, manifests: list[dict]) -> dict[str, dict]:
    """The shards' hash-split checks over row document ids, recomputed on the merged rows of a corpus.

    (Event checks - user@position, time-split source lines - need no recomputation: every event belongs to one
    group, and every group to one shard, which `merge_shards` verified.)"""
    out = {}
    for key, rep in manifests[0]["splits"]["leakage"].items():
        corpus, _, relation = key.partition("/")
        if corpus != name or rep.get("method") != "hash" or key not in DOC_ID_CHECKS:
            continue
        if not isinstance(rep.get("unit"), str):
            raise RecforgeError(f"shard 0's manifest.json: splits.leakage.{key} names no id unit; rerun that shard")
        frame = merged
        if relation:
            frame = merged.filter(pl.col("meta").str.json_path_match("$.relation") == relation)
        out[key] = B.id_leakage(frame, "doc_ids", rep["unit"], "hash", rep.get("split"))
    return out
