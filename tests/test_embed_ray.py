"""`recforge embed --ray --shards N` on a local Ray cluster (2 CPUs), the offline MiniLM on a goodbooks slice.

What a user relies on: the Ray job writes the very parts of the one-process run (same ids, same vectors, one
plan); a worker killed mid-shard is retried and the output has no duplicated or missing id; a shard that keeps
failing ends the job with exit 1 naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the `ray` extra; `make install` installs it

from recforge.align.align_config import CatalogueSource, EmbedConfig  # noqa: E402
from recforge.align.embed import read_vectors, run_embed  # noqa: E402
from recforge.align.embed_ray import EXIT_AFTER_PART_ENV, run_embed_on_ray  # noqa: E402
from recforge.cli import main  # noqa: E402

from test_align_embed import write_catalogue  # noqa: E402

N_ITEMS, PART = 48, 8  # 6 parts: shard 0/2 encodes parts 0, 2, 4 and shard 1/2 parts 1, 3, 5


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A 2-CPU cluster whose workers see the digest cache and the fault-injection trigger path (none yet)."""
    trigger = tmp_path_factory.mktemp("fault") / "exit-after-part"
    with pytest.MonkeyPatch.context() as mp:  # set before ray.init: the workers inherit the driver's environment
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv(EXIT_AFTER_PART_ENV, str(trigger))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield trigger
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("catalogue") / "books.jsonl.gz"
    return path, write_catalogue(path, N_ITEMS)


def embed_cfg(out: Path, catalogue: Path, minilm_dir: Path) -> EmbedConfig:
    return EmbedConfig(model=str(minilm_dir), out_dir=str(out), shard_size=PART, batch_size=4, device="cpu",
                       catalogue=CatalogueSource(path=str(catalogue)))


def parts_of(out: Path) -> list[tuple[str, list[str], np.ndarray]]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((out / "shards").glob("part-*.parquet")):
        t = pq.read_table(f)
        rows.append((f.name, t.column("id").to_pylist(), np.asarray(t.column("vector").to_pylist(), dtype=np.float32)))
    return rows


def test_ray_job_writes_the_parts_of_the_one_process_run(local_cluster, catalogue, minilm_dir, tmp_path):
    cat, ids = catalogue
    run_embed(embed_cfg(tmp_path / "plain", cat, minilm_dir))
    out = run_embed_on_ray(embed_cfg(tmp_path / "ray", cat, minilm_dir), 2, progress=False)
    assert out["complete"] is True and out["rows"] == N_ITEMS
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["complete"] is True and manifest["stopped"] is None
    assert [(s["shard"], s["parts"]) for s in manifest["shards"]] == [("0/2", 3), ("1/2", 3)]
    # one plan, one part layout: the same plan.json, the same parts, id for id and vector for vector
    assert (tmp_path / "ray" / "plan.json").read_text() == (tmp_path / "plain" / "plan.json").read_text()
    plain, on_ray = parts_of(tmp_path / "plain"), parts_of(tmp_path / "ray")
    assert [(name, part_ids) for name, part_ids, _ in on_ray] == [(name, part_ids) for name, part_ids, _ in plain]
    assert len(on_ray) == N_ITEMS // PART
    for (name, _, a), (_, _, b) in zip(plain, on_ray):
        np.testing.assert_array_equal(a, b)
        assert (tmp_path / "ray" / "shards" / name).read_bytes() == (tmp_path / "plain" / "shards" / name).read_bytes()
    got, _ = read_vectors(tmp_path / "ray")
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert json.loads((tmp_path / "ray" / "index_ids.json").read_text()) == got
    progress = json.loads((tmp_path / "ray" / "progress.json").read_text())
    assert progress["rows_done"] == N_ITEMS and progress["chunks_done"] == progress["chunks"] == 6
    assert progress["shards_done"] == 2


def test_worker_killed_mid_shard_is_retried_without_duplicates_or_gaps(local_cluster, catalogue, minilm_dir, tmp_path):
    cat, ids = catalogue
    trigger = local_cluster
    trigger.write_text("exit once")  # the first worker to finish a part removes it and dies (os._exit)
    out_dir = tmp_path / "out"
    out = run_embed_on_ray(embed_cfg(out_dir, cat, minilm_dir), 2, max_retries=2, progress=False)
    assert not trigger.exists(), "no worker died"
    assert out["complete"] is True
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] is True and all(s["problem"] is None for s in manifest["shards"])
    # the retried shard resumed: the part its dead worker wrote was kept, not encoded again
    assert sum(s["resumed_parts"] for s in manifest["shards"]) == 1
    got, vecs = read_vectors(out_dir)
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)) == N_ITEMS  # each id exactly once
    assert vecs.shape == (N_ITEMS, 384)


def test_a_shard_that_keeps_failing_ends_the_job_with_exit_1_naming_it(local_cluster, catalogue, minilm_dir, tmp_path, capsys):
    import yaml

    cat, _ = catalogue
    out_dir = tmp_path / "out"
    (out_dir / "shards" / "part-00001.parquet").mkdir(parents=True)  # shard 1/2 can never write its first part
    recipe = tmp_path / "embed.yaml"
    recipe.write_text(yaml.safe_dump(embed_cfg(out_dir, cat, minilm_dir).model_dump(mode="json")))
    rc = main(["embed", str(recipe), "--ray", "--shards", "2", "--max-shard-retries", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "shard 1/2 failed after 2 attempt(s)" in err and "IsADirectoryError" in err
    assert "shard 0/2" not in err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["complete"] is False  # read as unfinished downstream
    assert [s["attempts"] for s in manifest["shards"]] == [1, 2]
    assert not (out_dir / "index.faiss").exists()
    assert sorted(p.name for p in (out_dir / "shards").glob("part-*.parquet") if p.is_file()) == [
        "part-00000.parquet", "part-00002.parquet", "part-00004.parquet"]  # shard 0's parts are kept for a rerun
