"""`recforge embed`: vectors equal sentence-transformers', every id exactly once (also after SIGKILL), int8 retrieval, faiss."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recforge.align.align_config import CatalogueSource, EmbedConfig
from recforge.align.embed import nearest, plan_batches, read_vectors, run_embed
from recforge.config import RecforgeError


@pytest.fixture(scope="module", autouse=True)
def digest_cache(tmp_path_factory):
    """Keep the sha256 cache of model files (recforge.fingerprint) out of the home folder (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def write_catalogue(path: Path, n: int, bad_rows: bool = False) -> list[str]:
    books = []
    with gzip.open(resolve_sample(), "rt") as f:
        for line in f:
            books.append(json.loads(line))
            if len(books) >= n:
                break
    with gzip.open(path, "wt") as out:
        for b in books:
            out.write(json.dumps(b) + "\n")
        if bad_rows:
            out.write("{not json\n")
            out.write(json.dumps({"title": "no id"}) + "\n")
            out.write(json.dumps({**books[0], "title": "Another book"}) + "\n")  # a repeated id, other content
    return [str(b["book_id"]) for b in books]


def resolve_sample() -> Path:
    from recforge.io import resolve_path

    return resolve_path("sample://goodbooks_10k_catalog/books.jsonl.gz")


def test_plan_batches_sorts_and_respects_budget():
    lengths = [5, 50, 7, 20, 50, 6]
    order, batches = plan_batches(lengths, max_batch=4, token_budget=100)
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    covered = [i for a, b in batches for i in order[a:b]]
    assert sorted(covered) == list(range(6))
    for a, b in batches:
        assert (b - a) * lengths[order[a]] <= 100 or b - a == 1


def test_embed_matches_st_encode_and_quarantines_bad_rows(tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    cat = tmp_path / "books.jsonl.gz"
    ids = write_catalogue(cat, 64, bad_rows=True)
    cfg = EmbedConfig(model=str(minilm_dir), out_dir=str(tmp_path / "out"), shard_size=24, batch_size=16,
                      catalogue=CatalogueSource(path=str(cat)))
    out = run_embed(cfg)
    assert out["rows"] == 64
    got_ids, vecs = read_vectors(tmp_path / "out")
    assert sorted(got_ids) == sorted(ids) and len(got_ids) == len(set(got_ids))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rejects"]["by_reason"] == {"invalid_json": 1, "conflicting_duplicate": 1, "missing_id": 1}
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 3

    texts = {}
    with gzip.open(cat, "rt") as f:
        for line in f:
            try:
                b = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "book_id" in b:
                texts.setdefault(str(b["book_id"]), f"{b['title']} | {', '.join(b['authors'])}")
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    ref = st.encode([texts[i] for i in got_ids], batch_size=32)
    cos = (vecs * ref).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999

    hits = nearest(tmp_path / "out", vecs[:5], k=3)
    assert [h[0][0] for h in hits] == got_ids[:5]  # each vector's nearest neighbour is itself

    # int8: what a user relies on is that retrieval over the int8 catalogue finds what float32 retrieval finds.
    # Queries: 40 goodbooks genre tags (search) and every catalogue vector (more-like-this), MiniLM-encoded.
    # Tolerance (measured 0.97-0.98 mean, 0.9 worst on this slice; a wrong scale or int8 overflow gives 0.65-0.73):
    # mean recall@10 against float32 >= 0.95, no query below 0.8.
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg8 = cfg.model_copy(update={"out_dir": str(tmp_path / "out8"), "quantize": "int8"})
    run_embed(cfg8)
    shards = sorted((tmp_path / "out8" / "shards").glob("part-*.parquet"))
    assert pa.concat_tables([pq.read_table(f) for f in shards]).schema.field("vector").type == pa.list_(pa.int8(), 384)
    ids8, vecs8 = read_vectors(tmp_path / "out8")
    assert ids8 == got_ids
    # read back as float vectors interchangeable with the float32 ones (unit length, same direction), yet quantised
    cos8 = (vecs8 * vecs).sum(1) / np.linalg.norm(vecs8, axis=1) / np.linalg.norm(vecs, axis=1)
    assert cos8.min() >= 0.998 and np.abs(np.linalg.norm(vecs8, axis=1) - 1).max() <= 0.01
    assert not np.allclose(vecs8, vecs, atol=1e-4)

    def recall_at_10(queries: np.ndarray, drop_self: bool) -> list[float]:
        k = 11 if drop_self else 10
        f32, i8 = nearest(tmp_path / "out", queries, k=k), nearest(tmp_path / "out8", queries, k=k)
        return [len({i for i, _ in a[int(drop_self):]} & {i for i, _ in b[int(drop_self):]}) / 10 for a, b in zip(f32, i8)]

    tags = genre_tags(40)
    search = recall_at_10(st.encode(tags), drop_self=False)
    similar = recall_at_10(vecs, drop_self=True)
    for name, recall in (("tag search", search), ("more like this", similar)):
        assert np.mean(recall) >= 0.95 and min(recall) >= 0.8, (name, np.mean(recall), min(recall))


def genre_tags(n: int) -> list[str]:
    """The first n distinct goodbooks tag names (ASCII, not shelf names such as to-read): real search phrases."""
    from recforge.io import resolve_path

    tags: list[str] = []
    with gzip.open(resolve_path("sample://goodbooks_10k_book_tags/books_tags.jsonl.gz"), "rt") as f:
        for line in f:
            for t in json.loads(line)["tags"]:
                name = t["tag_name"]
                if name not in tags and name.isascii() and "read" not in name:
                    tags.append(name)
            if len(tags) >= n:
                return tags[:n]
    return tags


def test_changed_catalogue_is_refused(tmp_path, minilm_dir):
    cat = tmp_path / "books.jsonl.gz"
    write_catalogue(cat, 20)
    cfg = EmbedConfig(model=str(minilm_dir), out_dir=str(tmp_path / "out"), catalogue=CatalogueSource(path=str(cat)))
    run_embed(cfg)
    write_catalogue(cat, 25)
    with pytest.raises(RecforgeError, match="books.jsonl.gz: the catalogue's content changed"):
        run_embed(cfg)


def test_bf16_compute_is_close_to_float32_and_never_resumes_a_float32_run(tmp_path, minilm_dir):
    cat = tmp_path / "books.jsonl.gz"
    write_catalogue(cat, 40)
    cfg = EmbedConfig(model=str(minilm_dir), out_dir=str(tmp_path / "fp32"), faiss_index=False,
                      catalogue=CatalogueSource(path=str(cat)))
    run_embed(cfg)
    ids32, v32 = read_vectors(tmp_path / "fp32")
    run_embed(cfg.model_copy(update={"out_dir": str(tmp_path / "bf16"), "compute_dtype": "bfloat16"}))
    ids16, v16 = read_vectors(tmp_path / "bf16")
    assert ids16 == ids32 and v16.dtype == np.float32
    cos = (v16 * v32).sum(1) / np.linalg.norm(v16, axis=1) / np.linalg.norm(v32, axis=1)
    assert cos.min() >= 0.999 and not np.allclose(v16, v32, atol=1e-6)  # bf16 really ran, and stayed close
    with pytest.raises(RecforgeError, match="different plan .*compute_dtype"):
        run_embed(cfg.model_copy(update={"compute_dtype": "bfloat16"}))  # the float32 out_dir is not mixed


def retrain_in_place(weights: Path) -> None:
    """What retraining into the same folder looks like: other weight bytes, the very same file size."""
    import struct

    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]  # safetensors: u64 header length, header, tensor data
        f.seek(start)
        byte = f.read(1)[0]
        f.seek(start)
        f.write(bytes([byte ^ 1]))  # the lowest mantissa bit of the first weight: still a valid float
    assert weights.stat().st_size == size


def test_retrained_model_in_the_same_folder_is_refused(tmp_path, minilm_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(minilm_dir, model)
    cat = tmp_path / "books.jsonl.gz"
    write_catalogue(cat, 12)
    cfg = EmbedConfig(model=str(model), out_dir=str(tmp_path / "out"), faiss_index=False, catalogue=CatalogueSource(path=str(cat)))
    run_embed(cfg)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["job"] == "embed" and len(plan["model"]["digest"]) == 64
    retrain_in_place(model / "model.safetensors")
    with pytest.raises(RecforgeError, match=r"different plan \(model.digest\)"):
        run_embed(cfg)


def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path, minilm_dir):
    cat = tmp_path / "books.jsonl.gz"
    ids = write_catalogue(cat, 480)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "recforge", "embed", str(Path(__file__).parents[1] / "align/recipes/embed_goodbooks.yaml"),
           f"model={minilm_dir}", f"out_dir={out}", f"catalogue.path={cat}", "shard_size=20", "batch_size=4",
           "faiss_index=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded machine starts the subprocess slowly
    while time.time() < deadline and len(list((out / "shards").glob("part-*.parquet"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list((out / "shards").glob("part-*.parquet")))
    assert 1 <= before < 24, "the run must be killed part-way"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # killed: never read as finished
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_shards"] == before
    assert manifest["encoded_this_run"] == 480 - 20 * before
    got, _ = read_vectors(out)
    assert len(got) == len(set(got)) == 480 and set(got) == set(ids)
