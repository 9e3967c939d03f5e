"""Kill-and-resume reliability: SIGKILL a `recforge generate` subprocess at random points, resume, and get
exactly one row per input id, identical to an uninterrupted greedy run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recforge.config import load_recipe
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.runner import read_generations, run_generate

TAXONOMY = ["fantasy", "fiction", "classics", "romance", "mystery", "young-adult", "history", "science-fiction"]


def make_recipe(tmp: Path, model: Path, n_items: int, out: Path, chunk_size: int) -> Path:
    items = tmp / "items.jsonl"
    if not items.exists():
        words = ["night", "sea", "garden", "war", "road", "star", "king", "river", "glass"]
        with items.open("w") as f:
            for i in range(1, n_items + 1):
                f.write(json.dumps({"book_id": i, "title": f"The {words[i % 9]} of {words[(i * 7) % 9]} {i}", "authors": [f"Author {i % 13}"]}) + "\n")
    recipe = {
        "task": "interest_tags",
        "prompt_vars": {"k": 3, "show_taxonomy": False},
        "input": {"path": str(items), "id": "book_id", "fields": {"title": "title", "authors": "authors"}, "constants": {"entity_type": "item"}},
        "taxonomy": {"tags": TAXONOMY},
        "model": {"name_or_path": str(model)},
        "engine": {"kind": "transformers", "batch_size": 8, "cpu_threads": 1},
        "sampling": {"max_tokens": 20},
        "max_retries": 1,
        "chunk_size": chunk_size,
        "out_dir": str(out),
    }
    path = tmp / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def shard_count(out: Path) -> int:
    d = out / "shards"
    return len(list(d.glob("part-*.parquet"))) if d.is_dir() else 0


def rows_by_id(out: Path) -> dict[str, str]:
    rows = read_generations(out).to_pylist()
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines() if x.strip()]
    ids = [r["id"] for r in rows] + [f["id"] for f in failed]
    assert len(ids) == len(set(ids)), "an id appears twice"
    result = {r["id"]: r["output"] for r in rows}
    result.update({f["id"]: "FAILED:" + f["reason"] for f in failed})
    return result


def kill_and_resume(tmp: Path, model: Path, n_items: int, chunk_size: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    ref_out, out = tmp / "reference", tmp / "killed"
    run_generate(load_recipe(GenerateConfig, make_recipe(tmp, model, n_items, ref_out, chunk_size)), progress=False)
    reference = rows_by_id(ref_out)
    assert len(reference) == n_items

    recipe = make_recipe(tmp, model, n_items, out, chunk_size)
    cmd = [sys.executable, "-m", "recforge", "generate", str(recipe), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    n_chunks = -(-n_items // chunk_size)
    killed = 0
    for _ in range(kills):
        before = shard_count(out)
        if before >= n_chunks - 1:
            break
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while shard_count(out) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # wait until this run has made progress, then kill it somewhere in the next chunk(s)
        # ...then kill it at a random moment within the next chunk or two (never letting it finish).
        kill_at = time.time() + rng.uniform(0.0, 0.6)
        while time.time() < kill_at and shard_count(out) < before + 2 and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 1
    assert 0 < shard_count(out) < n_chunks  # the kills really interrupted the job
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list((out / "shards").glob(".part-*.tmp"))
    got = rows_by_id(out)
    assert sorted(got, key=int) == [str(i) for i in range(1, n_items + 1)]  # none lost, none duplicated
    assert got == reference  # identical to the uninterrupted greedy run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True


def test_kill_and_resume_small(tiny_model_dir, tmp_path):
    kill_and_resume(tmp_path, tiny_model_dir, n_items=48, chunk_size=6, kills=2, seed=1)


@pytest.mark.slow
def test_kill_and_resume_300_items(tiny_model_dir, tmp_path):
    kill_and_resume(tmp_path, tiny_model_dir, n_items=300, chunk_size=10, kills=5, seed=2)
