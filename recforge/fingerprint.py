"""Content fingerprints of model folders, shared by `generate` (run fingerprint) and `embed` (plan).

`folder_digest(path)` is one sha256 over the sorted relevant files of a folder (relative name + full
content). Hashing only names and sizes is not enough: retraining a model of the same architecture
rewrites its weights with exactly the same sizes, and a resume would silently mix two models' rows.

Full hashes of multi-GB weights are slow, so each file's sha256 is cached in a small JSON file,
`$RECFORGE_CACHE/sha256.json` (default `~/.cache/recforge/sha256.json`), keyed by the file's resolved
path, mtime_ns and size: an untouched file is never read twice; a rewritten one (new mtime) is. Files
modified in the last few seconds are not cached (their mtime could repeat on a quick rewrite).
The cache is only an accelerator: it is written atomically, and an unreadable or unwritable cache
just means files are hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# Files that decide what a model computes: configs, weights, tokenizers, chat templates, remote code.
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt", ".py", ".gguf", ".tiktoken")
# Hidden folders (.git, .cache) and training checkpoints are not the model that gets served.
SKIP_DIR_PREFIXES = (".", "checkpoint-")
BIG_FILE = 64 << 20  # a newly hashed file this big is saved to the cache at once (a kill keeps the work)
SETTLED_NS = 3_000_000_000  # files modified less than 3 s before they are hashed are not cached


def cache_path() -> Path:
    root = os.environ.get("RECFORGE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "recforge"
    return base / "sha256.json"


def _load_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    from recforge.io import atomic_write_json

    try:
        atomic_write_json(cache_path(), cache)
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def _stream_sha256(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, cache: dict | None = None) -> str:
    """sha256 of a file's content, from `cache` when its (resolved path, mtime_ns, size) is unchanged."""
    p = Path(path).resolve()
    st = p.stat()
    entries = cache if cache is not None else {}
    hit = entries.get(str(p))
    if isinstance(hit, dict) and hit.get("mtime_ns") == st.st_mtime_ns and hit.get("size") == st.st_size:
        return hit["sha256"]
    digest = _stream_sha256(p)
    # File times tick coarsely (a few ms; seconds on some file systems), so a file written moments ago could be
    # rewritten with the very same mtime: like git's "racily clean" rule, only settled files are cached.
    if time.time_ns() - st.st_mtime_ns > SETTLED_NS:
        entries[str(p)] = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "sha256": digest}
    return digest


def files_sha256(paths: dict[str, str | os.PathLike]) -> dict[str, str | None]:
    """{name: content sha256} of each file, through the cache (None for a folder or a missing path)."""
    from recforge.io import resolve_path

    cache = _load_cache()
    before = dict(cache)
    out: dict[str, str | None] = {}
    for name, path in paths.items():
        p = resolve_path(path)
        out[name] = file_sha256(p, cache) if p.is_file() else None
    if cache != before:
        _save_cache(cache)
    return out


def relevant_files(root: Path, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> list[Path]:
    """The files of `root` (and its sub-folders, e.g. sentence-transformers modules) that are hashed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(SKIP_DIR_PREFIXES)]
        found += [Path(dirpath) / f for f in filenames if f.endswith(suffixes) and not f.startswith(".")]
    return sorted(found, key=lambda f: f.relative_to(root).as_posix())


def folder_digest(path: str | os.PathLike, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> str:
    """sha256 over (relative name, content sha256) of every relevant file of a folder, in sorted order."""
    root = Path(path)
    cache = _load_cache()
    before = dict(cache)
    h = hashlib.sha256()
    for f in relevant_files(root, suffixes):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(f, cache).encode() + b"\n")
        if cache != before and f.stat().st_size >= BIG_FILE:
            _save_cache(cache)  # minutes of hashing are not lost to a kill
            before = dict(cache)
    if cache != before:
        _save_cache(cache)
    return h.hexdigest()
