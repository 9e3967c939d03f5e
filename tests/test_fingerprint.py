"""`recforge.fingerprint.folder_digest`: content (not sizes) decides, and the per-file sha256 cache is used and invalidated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recforge import fingerprint
from recforge.fingerprint import cache_path, folder_digest


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every file whose content is streamed through sha256."""
    seen: list[Path] = []
    real = fingerprint._stream_sha256

    def counting(path, *a, **kw):
        seen.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(fingerprint, "_stream_sha256", counting)
    return seen


def make_model(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "1_Pooling").mkdir()  # sentence-transformers modules live in sub-folders
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    age(*root.rglob("*.*"))
    return root


def age(*files: Path, seconds: int = 3600) -> None:
    """Move mtimes an hour back: a file written seconds ago is deliberately not cached (see below)."""
    for f in files:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000))


def test_same_sizes_other_bytes_give_another_digest(tmp_path):
    model = make_model(tmp_path / "m")
    before = folder_digest(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1
    weights.write_bytes(bytes(data))  # "retrained": same size, one bit differs
    assert folder_digest(model) != before
    data[1000] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_digest(model) == before  # content decides, not the mtime

    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert folder_digest(model) != before  # sub-folder files count


def test_files_that_are_not_the_model_do_not_count(tmp_path):
    model = make_model(tmp_path / "m")
    before = folder_digest(model)
    (model / "README.md").write_text("notes")
    (model / ".git").mkdir()
    (model / ".git" / "index.json").write_text("{}")
    (model / "checkpoint-100").mkdir()
    (model / "checkpoint-100" / "model.safetensors").write_bytes(b"optimizer and older weights")
    assert folder_digest(model) == before
    (model / "model.safetensors").rename(model / "model-00001.safetensors")
    assert folder_digest(model) != before  # names are part of the digest


def test_cache_is_hit_and_invalidated_when_mtime_changes(tmp_path, reads, cache_dir):
    model = make_model(tmp_path / "m")
    first = folder_digest(model)
    assert sorted(p.name for p in reads) == ["config.json", "config.json", "model.safetensors"]
    cache = json.loads(cache_path().read_text())
    assert cache_path() == cache_dir / "sha256.json"
    weights = str((model / "model.safetensors").resolve())
    assert cache[weights]["size"] == 16384 and len(cache[weights]["sha256"]) == 64

    reads.clear()
    assert folder_digest(model) == first
    assert reads == []  # nothing re-read: every (path, mtime_ns, size) was in the cache

    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    assert folder_digest(model) == first
    assert [p.name for p in reads] == ["model.safetensors"]  # only the file whose mtime changed
    assert json.loads(cache_path().read_text())[weights]["mtime_ns"] == st.st_mtime_ns + 1_000_000_000


def test_an_unwritable_cache_only_costs_rehashing(tmp_path, monkeypatch, reads):
    model = make_model(tmp_path / "m")
    expected = folder_digest(model)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RECFORGE_CACHE", str(blocker))  # the cache file cannot be created under a file
    reads.clear()
    assert folder_digest(model) == expected
    assert len(reads) == 3


def test_a_file_written_moments_ago_is_not_cached(tmp_path, reads):
    """File times tick coarsely, so a rewrite right after hashing can keep the old mtime: such a file is re-read."""
    model = make_model(tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 16384)
    first = folder_digest(model)
    weights.write_bytes(b"b" * 16384)  # same size, maybe even the same mtime tick
    reads.clear()
    assert folder_digest(model) != first
    assert [p.name for p in reads] == ["model.safetensors"]
    assert str(weights.resolve()) not in json.loads(cache_path().read_text())
