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
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, Field, ValidationError

from recforge.config import RecforgeError, format_validation_error, load_yaml
from recforge.data_recipes import builders as B
from recforge.data_recipes.corpus_io import (
    CorpusWriter,
    iter_parquet_batches,
    read_column,
    remove_old_shards,
)
from recforge.readers import (
    RejectLog,
    SourceConfig,
    features_table,
    read_item_tags,
    read_items,
    read_judgments,
    read_queries,
)
from recforge.data_recipes.lazy_read import read_interactions
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.data_recipes.serialize import Serializer, TokenCounter
from recforge.data_recipes.splits import TRAIN
from recforge.manifest import RunRecorder
from recforge.records import corpus_schema, pairs_schema
from recforge.runstate import output_lock, read_manifest, unfinished_reason
from recforge.shards import ShardSpec

CORPUS_NAMES = ("items", "queries", "query_item", "field_targets", "in_context", "reading", "pairs", "replay", "mix")


def read_features(src: SourceConfig) -> pl.DataFrame:
    """The generate stage's features table (`recforge.readers.features_table`), the recipe's own column names
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


def write_corpus(rows: pl.DataFrame | Iterable[pl.DataFrame], out_dir: Path, name: str, rows_per_shard: int,
                 pairs: bool = False) -> dict[str, Any]:
    """Write one corpus as `<split>-0000i-of-0000n.parquet` shards; old shards of the corpus are removed first.

    `rows`: the corpus in one frame, or its rows as a stream of frames (any splits: the `split` column routes
    them). Train rows, then eval rows, each in
    the order given, `rows_per_shard` per file: the layout is the same for a frame and for its rows streamed
    (`corpus_io.CorpusWriter`: each file is written under a hidden temporary name and renamed when done)."""
    schema = pairs_schema() if pairs else corpus_schema()
    columns = B.PAIRS_COLUMNS if pairs else B.CORPUS_COLUMNS
    writer = CorpusWriter(out_dir, name, schema, columns, rows_per_shard, "pairs" if pairs else "corpus")
    try:
        for batch in [rows] if isinstance(rows, pl.DataFrame) else rows:
            writer.write(batch)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


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
        B.check_mix_weights(cfg.mix, mix_pool(dict.fromkeys(names)))

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


def corpus_files(out_dir: Path, written: dict[str, Any], split: str) -> list[Path]:
    """The files of one split of a corpus `write_corpus` wrote (its return value)."""
    return [out_dir / f for f in written.get("files", {}).get(split, [])]


# The corpora other than in_context are built whole and then filtered, so the reports inside a shard's manifest
# (their leakage checks, pair-kind counts) describe the whole corpus; `corpora.<name>.rows` counts the shard's rows.
SHARD_KEYS = "in_context: the row's group; pairs: anchor_id; other corpora: the first document id"


def shard_key(name: str) -> pl.Expr:
    """The expression of a corpus row's shard key (SHARD_KEYS)."""
    if name == "pairs":
        return pl.col("anchor_id")
    if name == "in_context":
        return pl.col("meta").str.json_path_match("$.group")
    return pl.col("doc_ids").list.first()


def shard_rows(name: str, frame: pl.DataFrame, shard: ShardSpec) -> pl.DataFrame:
    """The rows of a built corpus whose group key belongs to `shard` (SHARD_KEYS)."""
    if not shard.active or frame.height == 0:
        return frame
    return shard.filter(frame.with_columns(shard_key(name).alias("_shard_key")), "_shard_key").drop("_shard_key")


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
                 shard: ShardSpec = ShardSpec()) -> Iterator[tuple[str, B.Built]]:
    """(name, Built) for each planned corpus, one at a time, in `names` order. The in-context corpus is streamed
    (`Built.batches`, built while it is written); the others are frames of the shard's rows. `mix` is yielded
    last with no frame: it is made from the written corpora (`write_mix`)."""
    item_texts = B.item_text_frame(inp.items, serializer) if inp.items else None
    query_texts = B.query_text_frame(inp.queries, serializer) if inp.queries else None
    judgments = B.judgments_frame(inp.judgments) if inp.judgments else None

    def sharded(name: str, result: B.Built) -> tuple[str, B.Built]:  # the cheap corpora: built whole, then filtered
        result.frame = shard_rows(name, result.frame, shard)
        return name, result

    if "items" in names:
        yield sharded("items", B.build_items(inp.items, serializer, cfg.split))
    if "queries" in names:
        yield sharded("queries", B.build_queries(inp.queries, serializer, cfg.split))
    if "query_item" in names:
        yield sharded("query_item", B.build_query_item(query_texts, judgments, item_texts, cfg.query_item, cfg.split))
    if "field_targets" in names:
        yield sharded("field_targets", B.build_field_targets(inp.items, serializer, cfg.field_targets, cfg.split))

    scores, score_report = None, {}
    wants_scores = (cfg.pairs.enabled and cfg.pairs.item_item.enabled) or (
        cfg.in_context.enabled and "co_engaged_items" in cfg.in_context.relations)
    if wants_scores and inp.interactions is not None:
        scores, score_report = B.co_engagement_scores(inp.interactions, cfg.pairs.item_item, cfg.split,
                                                      cfg.in_context.chunk_rows)

    if "in_context" in names:
        # already the shard's rows: each relation keeps its own groups' links / events before grouping
        yield "in_context", B.build_in_context_stream(cfg.in_context, cfg.split, counter, item_texts, query_texts,
                                                      judgments, inp.interactions, scores,
                                                      score_report.get("split"), shard)
    if "reading" in names:
        yield sharded("reading", B.build_reading(item_texts, inp.features, cfg.reading, cfg.split))
    if "pairs" in names:
        yield sharded("pairs", build_pairs(cfg, inp, item_texts, query_texts, judgments, scores, score_report))
    if "replay" in names:
        # its own corpus too, both splits: CPT replays the train rows and tracks general-text perplexity on the eval rows
        yield sharded("replay", B.Built(B.replay_corpus(inp.replay, cfg.split)))
    if "mix" in names:
        yield "mix", B.Built(None)


def mix_pool(corpora: dict[str, Any]) -> dict[str, Any]:
    """The corpora mix samples from: all but the pairs (another schema) and an earlier mix."""
    return {name: frame for name, frame in corpora.items() if name not in ("pairs", "mix")}


def write_mix(sources: dict[str, list[Path]], out_dir: Path, cfg, seed: int, rows_per_shard: int) -> dict[str, Any]:
    """The mix corpus from the train files of the corpora it names, written a batch at a time: the rows
    `B.mix_corpora` would give for those corpora in memory, in its order (`B.mix_plan`).

    Mixing picks rows by their rank in row-id order and shuffles them, so it needs random access to every
    train row of the mixed corpora; instead of holding them, this reads only the row ids (to rank them), then
    streams each corpus once, dropping each picked row into the bucket of its place in the mix (Arrow IPC files
    in a hidden folder of out_dir, ~`bucket` rows each), and finally writes the buckets in order, each sorted."""
    B.check_mix_weights(cfg, sources)
    train_ids = {}
    for name in cfg.weights:
        ids = read_column(sources[name], "row_id")
        # rank -> physical row: the stable order of the row ids (as `mix_corpora`'s sort by row id)
        train_ids[name] = pl.DataFrame({"id": ids}).with_row_index("_row").sort("id", maintain_order=True)["_row"]
    plan, report = B.mix_plan({n: r.len() for n, r in train_ids.items()}, cfg, seed)
    n = plan.height
    bucket = max(BUCKET_ROWS, -(-n // MAX_BUCKETS))
    plan = plan.with_row_index("_out")
    schema = corpus_schema().append(pa.field("_out", pa.uint32()))
    with tempfile.TemporaryDirectory(prefix=".mix-", dir=out_dir) as tmp:
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        try:
            for i, name in enumerate(cfg.weights):
                rows = train_ids.pop(name)
                picks = plan.filter(pl.col("_mix_of") == i)
                picks = pl.DataFrame({"_row": rows.gather(picks["_pos"]), "_out": picks["_out"]}).sort("_row")
                del rows
                start = 0
                for batch in iter_parquet_batches(sources[name], columns=list(B.CORPUS_COLUMNS)):
                    stop = start + batch.num_rows
                    lo, hi = picks["_row"].search_sorted(start, "left"), picks["_row"].search_sorted(stop, "left")
                    if hi > lo:
                        mine = picks.slice(lo, hi - lo)
                        taken = pa.Table.from_batches([batch]).cast(corpus_schema()).take(
                            pa.array((mine["_row"] - start).to_numpy()))
                        taken = taken.append_column("_out", pa.array(mine["_out"].to_numpy(), pa.uint32()))
                        for (b,), part in pl.from_arrow(taken).with_columns(
                                (pl.col("_out") // bucket).alias("_b")).partition_by("_b", as_dict=True).items():
                            if b not in writers:
                                writers[b] = pa.ipc.new_stream(Path(tmp) / f"{b:06d}.arrow", schema)
                            writers[b].write_table(part.drop("_b").to_arrow().cast(schema))
                    start = stop
        finally:
            for w in writers.values():
                w.close()
        del plan

        def ordered() -> Iterator[pl.DataFrame]:
            for b in sorted(writers):
                with pa.ipc.open_stream(Path(tmp) / f"{b:06d}.arrow") as reader:
                    part = pl.from_arrow(reader.read_all()).sort("_out")
                (Path(tmp) / f"{b:06d}.arrow").unlink()
                yield part.with_columns(pl.format("mix:{}:{}", pl.col("_out"), pl.col("row_id")).alias("row_id"))

        written = write_corpus(ordered(), out_dir, "mix", rows_per_shard)
    written["report"] = report
    return written


BUCKET_ROWS = 65_536  # mix rows per bucket (one bucket is in memory at a time when the mix is written)
MAX_BUCKETS = 1024  # open bucket files at most: larger mixes get larger buckets


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


def shard_corpus_files(name: str, folder: Path, manifest: dict) -> list[Path]:
    """A shard's files of one corpus (those its manifest lists, in its order), checked to be files of the shard."""
    info = manifest["corpora"].get(name) or {}
    files = [folder / f for split_files in info.get("files", {}).values() for f in split_files]
    for f in files:
        if not f.resolve().is_relative_to(folder.resolve()) or not f.is_file():
            raise RecforgeError(f"{folder}/manifest.json: corpus {name} lists {f}, not a file of this shard; rerun this shard")
    return files


def _unreadable_shard(folder: Path, name: str, err: BaseException) -> RecforgeError:
    return RecforgeError(f"{folder}/{name}: unreadable shard corpus ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''}); rerun this shard")


def _schema_error(name: str, what: str) -> RecforgeError:
    return RecforgeError(f"{name}: the shards' corpora do not share one schema ({what}); "
                         "rerun the shards with one recforge version")


class _ShardChecks:
    """What `--merge` checks of one corpus, over its shards' files, reading a few columns of one file at a time:
    the row ids (kept: no id in two shards), each row's shard key (in its shard?), one schema, and the doc ids of
    the cross-shard leakage checks (kept as distinct id sets). The rows themselves are never all in memory."""

    def __init__(self, name: str, manifests: list[dict]):
        self.name = name
        self.id_col = "pair_id" if name == "pairs" else "row_id"
        self.checks = doc_id_checks(name, manifests)
        self.id_sets = {key: B.IdSets() for key in self.checks}
        self.ids: list[pl.DataFrame] = []
        self.schema: dict | None = None
        self.columns = set(B.PAIRS_COLUMNS if name == "pairs" else B.CORPUS_COLUMNS)

    def add_shard(self, spec: ShardSpec, folder: Path, files: list[Path]) -> None:
        key_cols = {"pairs": ["anchor_id"], "in_context": ["meta"]}.get(self.name, ["doc_ids"])
        wanted = {self.id_col, *key_cols}
        if self.checks:
            wanted |= {"split", "doc_ids"} | ({"meta"} if self.name == "in_context" else set())
        ids, wrong = [], 0
        for f in files:
            try:
                parquet = pq.ParquetFile(f)
                self._check_schema(pl.from_arrow(parquet.schema_arrow.empty_table()).schema)
                part = pl.from_arrow(parquet.read(columns=sorted(wanted)))
                wrong += part.height - shard_rows(self.name, part, spec).height
            except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as err:
                raise _unreadable_shard(folder, self.name, err) from None
            ids.append(part.get_column(self.id_col))
            for key, (relation, _, _) in self.checks.items():
                rows = part
                if relation:
                    rows = part.filter(pl.col("meta").str.json_path_match("$.relation") == relation)
                self.id_sets[key].add(rows)
            del part
        if wrong:
            raise RecforgeError(f"{folder}/{self.name}: {wrong} rows whose group key belongs to another shard")
        if ids:
            self.ids.append(pl.DataFrame({"id": pl.concat(ids)}).with_columns(pl.lit(spec.index).alias("_shard")))

    def _check_schema(self, schema: pl.Schema) -> None:
        """Every file has the corpus' columns, of one (Polars) type across all the shards' files."""
        missing = self.columns - set(schema.names())
        if missing:
            raise _schema_error(self.name, f"no column {sorted(missing)[0]!r}")
        types = {c: schema[c] for c in sorted(self.columns)}
        if self.schema is None:
            self.schema = types
        elif types != self.schema:
            differ = next(c for c in types if types[c] != self.schema[c])
            raise _schema_error(self.name, f"column {differ!r} is {self.schema[differ]} in one, {types[differ]} in another")

    def check_ids(self) -> None:
        """No row id in two shards (an id repeated inside one shard is that shard's own business, as before)."""
        if not self.ids:
            return
        ids = pl.concat(self.ids)
        self.ids = []
        dup = ids.group_by("id").agg(pl.col("_shard").unique().sort()).filter(pl.col("_shard").list.len() > 1)
        if dup.height:
            rid, where = dup.row(0)
            raise RecforgeError(f"{self.name}: row {rid!r} is in shards {where} ({dup.height} such rows)")

    def leakage(self) -> dict[str, dict]:
        return {key: self.id_sets[key].leakage(unit, "hash", rule) for key, (_, unit, rule) in self.checks.items()}


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
    """Two passes over the shards' files. First every check, on the id and key columns only; then, only if all
    passed, each corpus is copied a batch at a time, shard by shard, into out_dir (train rows, then eval rows, in
    shard order: the rows and order the old in-memory concatenation wrote). Memory follows a batch, the row ids
    of one corpus and its doc-id sets, not the corpus."""
    (out_dir / "rejects.jsonl").unlink(missing_ok=True)  # the shards' rejects stay in their folders
    inputs: dict[str, list[tuple[Path, list[Path]]]] = {}
    corpora, leakage = {}, {}
    for name in CORPUS_NAMES:
        checks = _ShardChecks(name, manifests)
        parts = []
        for (spec, folder), manifest in zip(shards, manifests):
            files = shard_corpus_files(name, folder, manifest)
            if files:
                checks.add_shard(spec, folder, files)
                parts.append((folder, files))
        if not parts:
            continue
        checks.check_ids()
        leakage.update(checks.leakage())
        inputs[name] = parts
    if cfg.mix.enabled:  # a mix naming a corpus no shard built fails before anything is written
        B.check_mix_weights(cfg.mix, mix_pool(dict.fromkeys(inputs)))
    for name in CORPUS_NAMES:
        if name not in inputs:
            remove_old_shards(out_dir / name)
            continue
        corpora[name] = write_corpus(_shard_batches(name, inputs[name]), out_dir, name, cfg.rows_per_shard,
                                     pairs=name == "pairs")
        run.add_output(name, out_dir / name, rows=sum(corpora[name]["rows"].values()))
    if cfg.mix.enabled:
        corpora["mix"] = write_mix({n: corpus_files(out_dir, corpora[n], TRAIN) for n in cfg.mix.weights},
                                   out_dir, cfg.mix, cfg.seed, cfg.rows_per_shard)
        run.add_output("mix", out_dir / "mix", rows=sum(corpora["mix"]["rows"].values()))
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


MERGE_BATCH_ROWS = 16_384  # rows copied at a time (an in-context row with its documents is a few KB)


def _shard_batches(name: str, parts: list[tuple[Path, list[Path]]]) -> Iterator[pl.DataFrame]:
    """A corpus' rows from its shards' files, shard by shard, file by file, a batch at a time (the writer routes
    each row to its split's files by its `split` column)."""
    for folder, files in parts:
        try:
            for batch in iter_parquet_batches(files, batch_rows=MERGE_BATCH_ROWS):
                yield pl.from_arrow(batch)
        except (OSError, pa.ArrowException) as err:  # reading: the writer's errors are raised where it writes
            raise _unreadable_shard(folder, name, err) from None


# the leakage checks `build_corpora` computes over each row's doc_ids (the others are over anchors or events)
DOC_ID_CHECKS = ("items", "queries", "field_targets", "in_context/items_by_query", "in_context/queries_by_item")


def doc_id_checks(name: str, manifests: list[dict]) -> dict[str, tuple[str, str, str | None]]:
    """The shards' hash-split checks over row document ids that `--merge` recomputes on a corpus' merged rows:
    key -> (relation or "", id unit, split rule).

    (Event checks - user@position, time-split source lines - need no recomputation: every event belongs to one
    group, and every group to one shard, which `merge_shards` verified.)"""
    out = {}
    for key, rep in manifests[0]["splits"]["leakage"].items():
        corpus, _, relation = key.partition("/")
        if corpus != name or rep.get("method") != "hash" or key not in DOC_ID_CHECKS:
            continue
        if not isinstance(rep.get("unit"), str):
            raise RecforgeError(f"shard 0's manifest.json: splits.leakage.{key} names no id unit; rerun that shard")
        out[key] = (relation, rep["unit"], rep.get("split"))
    return out
