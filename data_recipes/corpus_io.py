"""Corpus files written and read in batches: what lets `recforge data` and `--merge` hold a batch, not a corpus.

`CorpusWriter` takes a corpus as a stream of row batches (Polars frames, any mix of splits: a `split` column) and
writes the layout `write_corpus` always wrote: `<split>-0000i-of-0000n.parquet`, `rows_per_shard` rows per file,
train and eval rows each in the order they arrived. pyarrow's `ParquetWriter` appends row groups to a hidden
temporary file per shard (`.train-00003.parquet.tmp`: hidden, so no reader takes it for a shard); the number
of shards is known only at the end, when each finished file is fsynced and renamed to its final name. A run
killed half way leaves hidden temporaries, which the next run of the same folder removes, and a `running`
manifest (recforge/runstate.py), as before.

`iter_parquet_batches` reads files back a batch at a time (the merge, the mix).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.data_recipes.splits import EVAL, TRAIN
from recforge.io import naming_full_disk

SPLITS = (TRAIN, EVAL)
# a row group is written once this many bytes of rows are buffered (or the shard file is full): large enough for
# good compression and few row groups, small enough that the buffer is not what a run's memory is made of
ROW_GROUP_BYTES = 64 << 20
BATCH_ROWS = 65_536  # rows per batch when reading corpus files back
SHARD_RE = re.compile(r"^(train|eval)-\d{5}-of-\d{5}\.parquet$")
TEMP_RE = re.compile(r"^\.(train|eval)-\d{5}\.parquet\.tmp$")


def remove_old_shards(folder: Path) -> None:
    """Delete the shards a previous run wrote here, and the hidden temporaries of one that was killed (only
    files named like ours), so no stale rows mix in."""
    if folder.is_dir():
        for old in folder.iterdir():
            if SHARD_RE.match(old.name) or TEMP_RE.match(old.name):
                old.unlink()


class _SplitFiles:
    """One split's shard files: rows in arrival order, `rows_per_shard` per file, row groups of ~ROW_GROUP_BYTES."""

    def __init__(self, folder: Path, split: str, schema: pa.Schema, rows_per_shard: int):
        self.folder, self.split, self.schema, self.rows_per_shard = folder, split, schema, rows_per_shard
        self.temps: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.buffer: list[pa.Table] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            room = self.rows_per_shard - self.in_file - self.buffered_rows
            part, table = table.slice(0, room), table.slice(room)
            self.buffer.append(part)
            self.buffered_rows += part.num_rows
            self.buffered_bytes += part.nbytes
            if self.in_file + self.buffered_rows >= self.rows_per_shard or self.buffered_bytes >= ROW_GROUP_BYTES:
                self._flush()
            if self.in_file >= self.rows_per_shard:
                self._close_file()

    def _flush(self) -> None:
        if not self.buffered_rows:
            return
        if self.writer is None:
            path = self.folder / f".{self.split}-{len(self.temps):05d}.parquet.tmp"
            self.temps.append(path)
            with naming_full_disk(path):
                self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        table = pa.concat_tables(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        with naming_full_disk(self.temps[-1]):
            self.writer.write_table(table, row_group_size=table.num_rows)
        self.in_file += table.num_rows
        self.rows += table.num_rows
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0

    def _close_file(self) -> None:
        if self.writer is None:
            return
        path = self.temps[-1]
        with naming_full_disk(path):
            self.writer.close()
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        self.writer, self.in_file = None, 0

    def finish(self) -> list[Path]:
        """Flush, close, and rename the temporaries to `<split>-0000i-of-0000n.parquet` (n known only now)."""
        self._flush()
        self._close_file()
        n = len(self.temps)
        final = [self.folder / f"{self.split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
        for tmp, path in zip(self.temps, final):
            os.replace(tmp, path)
        self.temps = []
        return final

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the run is already failing with its own error
                pass
            self.writer = None
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)


class CorpusWriter:
    """`out_dir/name/<split>-*.parquet` from row batches; `close()` returns what `write_corpus` reports."""

    def __init__(self, out_dir: Path, name: str, schema: pa.Schema, columns: dict, rows_per_shard: int,
                 schema_name: str):
        self.out_dir, self.schema, self.columns, self.schema_name = out_dir, schema, list(columns), schema_name
        self.folder = out_dir / name
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_old_shards(self.folder)
        self.splits = {split: _SplitFiles(self.folder, split, schema, rows_per_shard) for split in SPLITS}

    def write(self, batch: pl.DataFrame) -> None:
        """Rows of any splits (a `split` column), routed to their split's files in the order given."""
        if batch.height == 0:
            return
        for split, files in self.splits.items():
            part = batch.filter(pl.col("split") == split)
            if part.height:
                files.add(part.select(self.columns).to_arrow().cast(self.schema))

    def close(self) -> dict:
        files: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        for split, part in self.splits.items():
            paths = part.finish()
            rows[split] = part.rows
            if paths:
                files[split] = [str(p.relative_to(self.out_dir)) for p in paths]
        return {"rows": rows, "files": files, "schema": self.schema_name}

    def abort(self) -> None:
        for part in self.splits.values():
            part.abort()


def iter_parquet_batches(files: Iterable[Path], columns: list[str] | None = None,
                         batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of Parquet files, in file order, a batch at a time (only `columns`, if given)."""
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def read_column(files: Iterable[Path], column: str) -> pl.Series:
    """One column of Parquet files (e.g. the row ids), without the other columns."""
    parts = [pl.from_arrow(pq.read_table(f, columns=[column]).column(column)) for f in files]
    if not parts:
        return pl.Series(column, [], dtype=pl.Utf8)
    return pl.concat(parts).rename(column)
