"""Files: atomic writes, Parquet shards, hashing, and `sample://` paths to the shipped data."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

SAMPLE_SCHEME = "sample://"


def samples_dir() -> Path:
    """Folder of the shipped sample datasets (installed with the package)."""
    from recforge import data_recipes

    return Path(data_recipes.__file__).resolve().parent / "samples"


def resolve_path(path: str | os.PathLike) -> Path:
    """`sample://esci_us_titles/products.jsonl.gz` -> the shipped copy; anything else -> an expanded Path."""
    text = os.fspath(path)
    if text.startswith(SAMPLE_SCHEME):
        return samples_dir() / text[len(SAMPLE_SCHEME) :]
    return Path(os.path.expandvars(text)).expanduser()


def parquet_files(path: str | os.PathLike, what: str, recursive: bool = False) -> list[Path]:
    """A Parquet file, or the `*.parquet` files of a folder (shards; sorted, hidden files skipped).

    `what` names the input in errors ("corpus", "pairs"); `recursive` also takes sub-folders' shards.
    """
    from recforge.config import RecforgeError

    p = resolve_path(path)
    if p.is_dir():
        found = p.rglob("*.parquet") if recursive else p.glob("*.parquet")
        files = sorted(f for f in found if not f.name.startswith("."))
        if not files:
            raise RecforgeError(f"{what} folder {path} holds no .parquet files")
        return files
    if not p.is_file():
        raise RecforgeError(f"{what} file not found: {path}")
    return [p]


def open_text(path: str | os.PathLike, errors: str = "strict") -> IO[str]:
    """Open a text file for reading, transparently un-gzipping `.gz`; a UTF-8 byte order mark is dropped
    (utf-8-sig), so it does not become part of the first row or the first CSV header."""
    path = resolve_path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=errors, newline="")
    return open(path, encoding="utf-8-sig", errors=errors, newline="")


def sha256_file(path: str | os.PathLike) -> str:
    """Content sha256 of a file: the project's one file digest (`recforge.fingerprint`, cached by path, mtime, size)."""
    from recforge.fingerprint import files_sha256

    digest = files_sha256({"file": path})["file"]
    if digest is None:
        raise FileNotFoundError(f"not a file: {path}")
    return digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full disk (ENOSPC) as an OSError naming the file being written: a plain write() error names
    none, and the CLI's one-line message must say where the space ran out."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC and not err.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the mode an ordinary open() would give
    tmp_path = Path(tmp)
    try:
        with naming_full_disk(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write a pyarrow Table to Parquet atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_parquet_shards(table, out_dir: str | os.PathLike, prefix: str, rows_per_shard: int = 100_000) -> list[Path]:
    """Split a pyarrow Table into `prefix-00000-of-0000N.parquet` shards (the naming `datasets` expects)."""
    out_dir = Path(out_dir)
    n = max(1, -(-table.num_rows // rows_per_shard))
    paths = []
    for i in range(n):
        part = table.slice(i * rows_per_shard, rows_per_shard)
        p = out_dir / f"{prefix}-{i:05d}-of-{n:05d}.parquet"
        write_parquet_atomic(part, p)
        paths.append(p)
    return paths


class JsonlAppender:
    """Append JSON lines with a flush + fsync per batch, for logs that must survive a kill (rejects, failures)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        with naming_full_disk(self.path):
            self._f.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")

    def flush(self) -> None:
        with naming_full_disk(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
