"""`recforge data --ray --shards N` on a local Ray cluster (2 CPUs), the shipped sample recipes.

What a user relies on: the Ray job (shards as Ray tasks, then the merge on the driver) writes exactly the
corpora of the one-process build; a worker killed mid-shard is re-run and the merged corpora have no duplicated
or missing row; a shard that keeps failing ends the job with exit 1 naming it and merges nothing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the `ray` extra; `make install` installs it

from recforge.cli import main  # noqa: E402
from recforge.data_recipes.build import run_data  # noqa: E402
from recforge.data_recipes.data_ray import run_data_on_ray  # noqa: E402
from recforge.runstate import read_manifest, unfinished_reason  # noqa: E402
from recforge.shards import ShardSpec  # noqa: E402

from test_data_shards import ESCI, GOODBOOKS, corpus_rows, recipe  # noqa: E402
from test_generate_ray import kill_worker_once, local_cluster  # noqa: E402,F401 (the 2-CPU cluster fixture)


@pytest.fixture(scope="module")
def whole_goodbooks(tmp_path_factory) -> dict:
    """The one-process build of the goodbooks recipe (the Makefile's `data` target), its corpora by name."""
    out = tmp_path_factory.mktemp("whole") / "goodbooks"
    run_data(recipe(GOODBOOKS, out))
    return corpus_rows(out)


def assert_same_corpora(out: Path, whole: dict) -> None:
    merged = corpus_rows(out)
    assert set(merged) == set(whole) and {"in_context", "pairs", "mix"} <= set(whole)
    for name, frame in whole.items():
        key = "pair_id" if name == "pairs" else "row_id"
        assert merged[name].get_column(key).is_unique().all(), f"{name}: a row id twice"
        assert merged[name].equals(frame), name  # same rows, texts, splits and meta: none missing, none extra


def test_ray_job_writes_the_corpora_of_the_one_process_build(local_cluster, whole_goodbooks, tmp_path, capsys):
    out = tmp_path / "ray"
    rc = main(["data", str(GOODBOOKS), f"out_dir={out}", "--ray", "--shards", "2"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "data on Ray: 2 shards built" in stdout and "merged 2 shards" in stdout and "leakage check: ok" in stdout
    assert_same_corpora(out, whole_goodbooks)
    manifest = read_manifest(out)
    assert manifest["command"] == "data merge" and unfinished_reason(manifest) is None
    progress = json.loads((out / "progress.json").read_text())
    assert progress["shards_done"] == 2 and progress["chunks_done"] == progress["chunks"] == 2
    assert progress["rows_done"] == sum(f.height for name, f in whole_goodbooks.items() if name != "mix")


def test_worker_killed_mid_shard_is_rerun_without_duplicated_or_missing_rows(local_cluster, whole_goodbooks, tmp_path):
    # goodbooks: a shard writes its first corpus ~2 s in and ends ~6 s in, a wide window to kill it in
    cfg = recipe(GOODBOOKS, tmp_path / "ray")
    shard_dir = Path(cfg.out_dir) / ShardSpec(0, 2).folder
    killed: list[int] = []
    watcher = threading.Thread(target=kill_worker_once, args=(shard_dir, killed, time.time() + 240, "*/train-*-of-*.parquet"))
    watcher.start()
    out = run_data_on_ray(cfg, 2, max_retries=2, progress=False)
    watcher.join()
    assert killed, "the watcher never saw shard 0 mid-build"
    assert out["stopped"] is None and all(s["problem"] is None for s in out["shards"])
    assert_same_corpora(Path(cfg.out_dir), whole_goodbooks)
    assert unfinished_reason(read_manifest(shard_dir)) is None
    assert not list(shard_dir.glob("*/.*.tmp")), "the killed attempt's temporaries are left"


def test_a_shard_that_keeps_failing_ends_the_job_with_exit_1_naming_it(local_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ShardSpec(1, 2).folder).mkdir(parents=True)
    (out / ShardSpec(1, 2).folder / "items").write_text("a file where the items corpus goes")  # never writable
    rc = main(["data", str(ESCI), f"out_dir={out}", "--ray", "--shards", "2", "--max-shard-retries", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "shard 1/2 failed after 2 attempt(s)" in err and "FileExistsError" in err
    assert "shard 0/2" not in err
    manifest = read_manifest(out)  # the job's, not a merge's: read as unfinished downstream
    assert manifest["command"] == "data --ray" and manifest["complete"] is False
    assert unfinished_reason(manifest) is not None
    assert [s["attempts"] for s in manifest["shards"]] == [1, 2]
    assert not (out / "items").exists()  # nothing merged
    assert unfinished_reason(read_manifest(out / ShardSpec(0, 2).folder)) is None  # shard 0 finished and kept


def test_flags_that_contradict_ray_are_refused(tmp_path, capsys):
    for extra in (["--shard", "0/2"], ["--merge"], ["--shards", "1"]):
        rc = main(["data", str(ESCI), f"out_dir={tmp_path / 'x'}", "--ray", *extra])
        assert rc != 0, extra
    assert main(["data", str(ESCI), f"out_dir={tmp_path / 'y'}", "--shards", "2"]) != 0
    err = capsys.readouterr().err
    assert "--shard and --ray" in err and "--merge and --ray" in err and "--shards 1: need at least 2" in err
    assert "--shards needs --ray" in err
