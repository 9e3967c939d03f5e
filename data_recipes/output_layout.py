"""A `recforge data` output folder on disk: each corpus as `<split>-0000i-of-0000n.parquet` files, and, for a
sharded run, which shard a corpus row belongs to.

Used by the run (`build`), the mix (`mix.write_mix`) and the shard merge (`shard_merge`), so the three write and
find files one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import polars as pl

from recforge.data_recipes.corpus_frames import CORPUS_COLUMNS, PAIRS_COLUMNS
from recforge.data_recipes.corpus_io import CorpusWriter
from recforge.records import corpus_schema, pairs_schema
from recforge.shards import ShardSpec

CORPUS_NAMES = ("items", "queries", "query_item", "field_targets", "in_context", "reading", "pairs", "replay", "mix")


def write_corpus(rows: pl.DataFrame | Iterable[pl.DataFrame], out_dir: Path, name: str, rows_per_shard: int,
                 pairs: bool = False) -> dict[str, Any]:
    """Write one corpus as `<split>-0000i-of-0000n.parquet` shards; old shards of the corpus are removed first.

    `rows`: the corpus in one frame, or its rows as a stream of frames (any splits: the `split` column routes
    them). Train rows, then eval rows, each in
    the order given, `rows_per_shard` per file: the layout is the same for a frame and for its rows streamed
    (`corpus_io.CorpusWriter`: each file is written under a hidden temporary name and renamed when done)."""
    schema = pairs_schema() if pairs else corpus_schema()
    columns = PAIRS_COLUMNS if pairs else CORPUS_COLUMNS
    writer = CorpusWriter(out_dir, name, schema, columns, rows_per_shard, "pairs" if pairs else "corpus")
    try:
        for batch in [rows] if isinstance(rows, pl.DataFrame) else rows:
            writer.write(batch)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


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
