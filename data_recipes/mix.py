"""The `mix` corpus: a weighted, seeded interleaving of this run's train corpora (replay included), for CPT.

How many rows each corpus gives and which ones is the project's one mixing rule, `recforge.mixing`
(`rows_for_shares`, `take`); this module orders them into one corpus - in memory (`mix_corpora`) or a batch at a
time from the written corpus files (`write_mix`), the same rows in the same order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa

from recforge.config import RecforgeError
from recforge.data_recipes.corpus_frames import CORPUS_COLUMNS, Built, as_corpus
from recforge.data_recipes.corpus_io import iter_parquet_batches, read_column
from recforge.data_recipes.output_layout import write_corpus
from recforge.data_recipes.recipe_config import MixCorpus
from recforge.data_recipes.splits import TRAIN
from recforge.mixing import rows_for_shares, take
from recforge.records import corpus_schema


def mix_pool(corpora: dict[str, Any]) -> dict[str, Any]:
    """The corpora mix samples from: all but the pairs (another schema) and an earlier mix."""
    return {name: frame for name, frame in corpora.items() if name not in ("pairs", "mix")}


def check_mix_weights(cfg: MixCorpus, available) -> None:
    """The recipe's mix weights name corpora this run builds, each with a weight > 0."""
    if not cfg.weights:
        raise RecforgeError("mix.weights: name at least one corpus with a weight, e.g. {in_context: 0.7, replay: 0.3}")
    for name, weight in cfg.weights.items():
        if name not in available:
            raise RecforgeError(f"mix.weights.{name}: no corpus named {name!r} was built in this run "
                                f"(built: {', '.join(sorted(available)) or 'none'})")
        if weight <= 0:
            raise RecforgeError(f"mix.weights.{name}: weights must be > 0, got {weight}")


def mix_plan(train_rows: dict[str, int], cfg: MixCorpus, seed: int) -> tuple[pl.DataFrame, dict]:
    """Which rows the mix takes, in its order: (`_mix_of`: the corpus' index in `cfg.weights`, `_pos`: the row's
    position among the corpus' train rows sorted by row id), one per mix row, and the ratios report.

    Only the corpora's train row counts enter (`recforge.mixing`: each corpus' count for its share, its rows
    `take`n with `seed + its index`), then one seeded shuffle interleaves them."""
    check_mix_weights(cfg, train_rows)
    empty = [n for n in cfg.weights if train_rows[n] == 0]
    if empty:
        raise RecforgeError(f"mix.weights: corpus {empty[0]!r} has no train rows to mix")
    shares, wants = rows_for_shares(train_rows, cfg.weights, cfg.total_rows)
    parts, counts = [], {}
    for i, (name, share) in enumerate(shares.items()):
        want, height = wants[name], train_rows[name]
        counts[name] = {"weight": cfg.weights[name], "share": round(share, 6), "rows": want,
                        "available": height, "repeated": want > height}
        parts.append(take(height, want, seed + i).to_frame().with_columns(pl.lit(i, dtype=pl.UInt32).alias("_mix_of")))
    plan = pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed).select("_mix_of", "_pos")
    n = plan.height
    for name in counts:
        counts[name]["actual_fraction"] = round(counts[name]["rows"] / n, 6)
    return plan, {"ratios": counts, "rows": n, "seed": seed}


def mix_row_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Mix rows in mix order -> their row ids `mix:<position>:<source row id>` (unique even where a small corpus
    repeats rows: whole passes plus a sample, `recforge.mixing.take`), in the corpus columns."""
    ids = pl.format("mix:{}:{}", pl.int_range(pl.len()), pl.col("row_id")).alias("row_id")
    return as_corpus(frame.with_columns(ids))


def mix_corpora(corpora: dict[str, pl.DataFrame], cfg: MixCorpus, seed: int) -> Built:
    """Weighted interleaving of the train rows of several corpora.

    Row counts follow the normalised weights. Without `total_rows`, the total is the largest one no
    corpus has to repeat rows for; with it, a corpus too small for its share gives every row as many whole
    times as fit plus a sample for the rest (reported as `repeated`). The interleaved order is a seeded shuffle (`mix_plan`; the same
    rows, a batch at a time, from corpus files: `write_mix`).
    """
    check_mix_weights(cfg, corpora)
    # sorted by row id: the sample is a function of the rows, not of their order (a merged sharded run == one run)
    train = {name: corpora[name].filter(pl.col("split") == TRAIN).sort("row_id", maintain_order=True)
             for name in cfg.weights}
    plan, report = mix_plan({n: f.height for n, f in train.items()}, cfg, seed)
    offsets, start = [], 0
    for frame in train.values():
        offsets.append(start)
        start += frame.height
    pool = pl.concat([as_corpus(f) for f in train.values()])
    where = plan.select(pl.col("_mix_of").replace_strict(list(range(len(offsets))), offsets, return_dtype=pl.Int64)
                        + pl.col("_pos"))
    mixed = pool[where.to_series()]
    return Built(mix_row_ids(mixed), report)


def write_mix(sources: dict[str, list[Path]], out_dir: Path, cfg, seed: int, rows_per_shard: int) -> dict[str, Any]:
    """The mix corpus from the train files of the corpora it names, written a batch at a time: the rows
    `mix_corpora` would give for those corpora in memory, in its order (`mix_plan`).

    Mixing picks rows by their rank in row-id order and shuffles them, so it needs random access to every
    train row of the mixed corpora; instead of holding them, this reads only the row ids (to rank them), then
    streams each corpus once, dropping each picked row into the bucket of its place in the mix (Arrow IPC files
    in a hidden folder of out_dir, ~`bucket` rows each), and finally writes the buckets in order, each sorted."""
    check_mix_weights(cfg, sources)
    train_ids = {}
    for name in cfg.weights:
        ids = read_column(sources[name], "row_id")
        # rank -> physical row: the stable order of the row ids (as `mix_corpora`'s sort by row id)
        train_ids[name] = pl.DataFrame({"id": ids}).with_row_index("_row").sort("id", maintain_order=True)["_row"]
    plan, report = mix_plan({n: r.len() for n, r in train_ids.items()}, cfg, seed)
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
                for batch in iter_parquet_batches(sources[name], columns=list(CORPUS_COLUMNS)):
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
