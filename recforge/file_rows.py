"""Raw rows of a file, per format (JSONL / JSONL.gz, CSV / TSV, Parquet), before any field is converted.

A line that does not parse (bad UTF-8, not a JSON object, a CSV row with the wrong number of columns) comes back as
a `RawRow` without values and its reason code, for the reject log. A file that cannot be read at all (a truncated
`.gz`, a `.parquet` that is not Parquet) is one error naming it, not a traceback. A UTF-8 byte order mark is not
part of the first row.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from recforge.config import RecforgeError

Format = Literal["auto", "jsonl", "csv", "tsv", "parquet"]


@dataclass
class RawRow:
    """One row as read: its line (1-based; the data row number for Parquet), its values, and for a row that did
    not parse (values None) the reject reason code and detail."""

    line: int
    values: dict[str, Any] | None  # None when the line could not be parsed at all
    raw: str
    reason: str = ""
    detail: str = ""


def detect_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                         (".tsv", "tsv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return kind
    raise RecforgeError(f"{path}: cannot tell the format from the file name; set format: jsonl|csv|tsv|parquet")


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Excel, Windows tools) is not part of the first row


def _binary_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f):
            yield line.removeprefix(BOM) if n == 0 else line


# What a broken file raises while being read: a truncated or corrupt gzip stream, a non-Parquet file.
# Only read calls are guarded (`_guarded`), so an error writing rejects (a full disk) is not mistaken for it.
def unreadable_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (EOFError, gzip.BadGzipFile, zlib.error, pa.ArrowException)


def _guarded(rows: Iterator[Any], path: Path, fmt: str) -> Iterator[Any]:
    """`rows`, with a broken file turned into one error naming it (no traceback), however far reading got."""
    errors = unreadable_errors()
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except errors as err:
            raise unreadable(path, fmt, err) from None
        yield row


def unreadable(path: Path, fmt: str, err: BaseException) -> RecforgeError:
    detail = (str(err).splitlines() or [""])[0][:200] or type(err).__name__
    gz = " (gzip)" if path.name.endswith(".gz") else ""
    return RecforgeError(f"{path}: not a readable {fmt}{gz} file, truncated or of another format: {detail}")


def _decode(line: bytes, keep_end: bool = False) -> tuple[str | None, str]:
    """UTF-8 text of a line; `keep_end` keeps the line end (csv needs it inside a quoted multi-line field)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 byte at offset {err.start}"
    return (text if keep_end else text.rstrip("\r\n")), ""


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    for n, line in enumerate(_binary_lines(path), start=1):
        text, problem = _decode(line)
        if text is None:
            yield RawRow(n, None, line.decode("utf-8", "backslashreplace").rstrip("\r\n"), "bad_utf8", problem)
            continue
        if not text.strip():
            continue  # blank lines carry no row
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield RawRow(n, None, text, "invalid_json", f"JSON error: {err.msg} at column {err.colno}")
            continue
        if not isinstance(obj, dict):
            yield RawRow(n, None, text, "invalid_json", f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield RawRow(n, obj, text)


def _iter_delimited(path: Path, delimiter: str) -> Iterator[RawRow]:
    bad: list[RawRow] = []
    physical = {"line": 0}  # the file line the csv reader has consumed up to (undecodable lines included)

    def decoded_lines() -> Iterator[str]:
        for n, line in enumerate(_binary_lines(path), start=1):
            physical["line"] = n
            # line ends kept: csv.reader joins the lines of a quoted field with them (stripped, "a\nb" became "ab")
            text, problem = _decode(line, keep_end=True)
            if text is None:
                bad.append(RawRow(n, None, line.decode("utf-8", "backslashreplace").rstrip("\r\n"), "bad_utf8", problem))
                continue
            yield text

    reader = csv.reader(decoded_lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    for cells in reader:
        yield from bad
        bad.clear()
        line = physical["line"]  # a quoted field spanning lines reports the line where the row ends
        raw = delimiter.join(cells)
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield RawRow(line, None, raw, "bad_csv_row", f"{len(cells)} columns, header has {len(header)}")
            continue
        yield RawRow(line, {h: (c if c != "" else None) for h, c in zip(header, cells)}, raw)
    yield from bad


def _iter_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        for row in batch.to_pylist():
            n += 1
            yield RawRow(n, row, "")  # raw filled lazily on reject (see raw_text)


def iter_raw_rows(path: Path, fmt: str) -> Iterator[RawRow]:
    if fmt == "jsonl":
        rows = _iter_jsonl(path)
    elif fmt in ("csv", "tsv"):
        rows = _iter_delimited(path, "," if fmt == "csv" else "\t")
    else:
        rows = _iter_parquet(path)
    return _guarded(rows, path, fmt)


def file_columns(path: Path, fmt: str) -> list[str] | None:
    """The columns a file declares (CSV/TSV header, Parquet schema); None for JSONL (rows may differ)."""
    try:
        return _file_columns(path, fmt)
    except unreadable_errors() as err:
        raise unreadable(path, fmt, err) from None


def _file_columns(path: Path, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if fmt in ("csv", "tsv"):
        for line in _binary_lines(path):
            text, _ = _decode(line)
            if text is None:
                return None
            return [h.strip() for h in next(csv.reader([text], delimiter="," if fmt == "csv" else "\t"))]
    return None


def raw_text(row: RawRow) -> str:
    """What a reject keeps of a row: the line as read, or (Parquet, whose rows have no text) the values as JSON."""
    return row.raw or json.dumps(row.values, ensure_ascii=False, default=str)
