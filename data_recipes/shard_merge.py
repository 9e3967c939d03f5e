"""`recforge data RECIPE --merge`: the N shard folders of a sharded run -> one output folder, checked across shards.

`recforge data RECIPE --shard i/N` (`build.run_data`) writes `out_dir/shard-IIIII-of-NNNNN/`; the merge checks that
every shard finished and ran this recipe, that no row id is in two shards, that every row sits in the shard its
group key hashes to (`output_layout.SHARD_KEYS`) and that no eval id is in a train row across shards, then copies
the corpora a batch at a time into `out_dir/` and builds the mix (over whole corpora) from them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, Field, ValidationError

from recforge.config import RecforgeError, format_validation_error, load_yaml
from recforge.data_recipes.corpus_frames import CORPUS_COLUMNS, PAIRS_COLUMNS, IdSets
from recforge.data_recipes.corpus_io import iter_parquet_batches, remove_old_shards
from recforge.data_recipes.mix import check_mix_weights, mix_pool, write_mix
from recforge.data_recipes.output_layout import CORPUS_NAMES, SHARD_KEYS, corpus_files, shard_rows, write_corpus
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.data_recipes.splits import TRAIN
from recforge.manifest import RunRecorder
from recforge.runstate import output_lock, read_manifest, unfinished_reason
from recforge.shards import ShardSpec


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
        self.id_sets = {key: IdSets() for key in self.checks}
        self.ids: list[pl.DataFrame] = []
        self.schema: dict | None = None
        self.columns = set(PAIRS_COLUMNS if name == "pairs" else CORPUS_COLUMNS)

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
        check_mix_weights(cfg.mix, mix_pool(dict.fromkeys(inputs)))
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
