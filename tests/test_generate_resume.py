"""Kill-and-resume reliability: SIGKILL a `recforge generate` subprocess at random points, resume, and get
exactly one row per input id, identical to an uninterrupted greedy run. Also what a resume does with failed
rows (engine errors retried, --retry-failed), the early stop on a dead engine, and multi-chunk submission;
engine errors are injected at the engine boundary only."""

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


def make_recipe(tmp: Path, model: Path, n_items: int, out: Path, chunk_size: int, **over) -> Path:
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
        "max_failure_rate": 1.0,  # the tiny model truncates many rows at 20 tokens; these tests check bookkeeping
        "out_dir": str(out),
        **over,
    }
    path = tmp / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module", autouse=True)
def digest_cache(tmp_path_factory):
    """Keep the sha256 cache of model files (recforge.fingerprint) out of the home folder (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


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

    # Two chunks per engine call, so kills land inside a multi-chunk submission as well as between shards
    # (the reference sends all its rows at once: the rows must not depend on how chunks were grouped).
    recipe = make_recipe(tmp, model, n_items, out, chunk_size, submit_rows=2 * chunk_size)
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


# ------------------------------------------------------------------ failed rows, retries, early stop, batching


@pytest.fixture
def engine(monkeypatch):
    """The engine boundary: records each `TransformersEngine.generate` call's request ids, and answers the ids
    `engine.fails(id)` picks with an engine error (as a CUDA error confined to those rows would); the real
    engine generates the rest."""
    from types import SimpleNamespace

    from recforge.generate.engine import GenerationResult
    from recforge.generate.transformers_engine import TransformersEngine

    state = SimpleNamespace(calls=[], fails=lambda rid: False)
    real = TransformersEngine.generate

    def generate(self, requests):
        state.calls.append([r.request_id for r in requests])
        healthy = [r for r in requests if not state.fails(r.request_id)]
        results = iter(real(self, healthy) if healthy else [])
        return [GenerationResult(r.request_id, error="engine_error: RuntimeError: CUDA error (injected)")
                if state.fails(r.request_id) else next(results) for r in requests]

    monkeypatch.setattr(TransformersEngine, "generate", generate)
    return state


def failed_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines() if x.strip()]


def asked(engine) -> set[str]:
    return {rid for call in engine.calls for rid in call}


def test_resume_retries_exactly_the_engine_error_rows(tiny_model_dir, tmp_path, engine):
    # 48 tokens: the tiny model completes every row, so a retried row must end up as an output row.
    ref_out, out = tmp_path / "reference", tmp_path / "out"
    run_generate(load_recipe(GenerateConfig, make_recipe(tmp_path, tiny_model_dir, 12, ref_out, 4, sampling={"max_tokens": 48})), progress=False)
    reference = rows_by_id(ref_out)
    assert not any(v.startswith("FAILED") for v in reference.values())

    cfg = load_recipe(GenerateConfig, make_recipe(tmp_path, tiny_model_dir, 12, out, 4, sampling={"max_tokens": 48}))
    broken = {"2", "7", "8"}
    engine.fails = broken.__contains__
    run_generate(cfg, progress=False)
    first = failed_lines(out)
    assert {f["id"]: (f["reason"], f["chunk"], f["attempts"]) for f in first} == {
        "2": ("engine_error", 0, 2), "7": ("engine_error", 1, 2), "8": ("engine_error", 1, 2)}
    assert shard_count(out) == 3  # their chunks are done: only the failure log knows about them

    engine.calls.clear()
    engine.fails = lambda rid: False
    manifest = run_generate(cfg, progress=False)  # a plain resume, no flag
    assert engine.calls == [["2", "7", "8"]]  # exactly those rows, in one engine call, nothing else re-run
    assert sorted(p.name for p in (out / "shards").glob("retry-*.parquet")) == ["retry-00000-001.parquet", "retry-00001-001.parquet"]
    assert failed_lines(out) == []
    assert rows_by_id(out) == reference  # no gaps, no duplicates, and the same rows an unbroken run made
    assert manifest["complete"] and manifest["outputs"][0]["rows"] == 12 and manifest["progress"]["rows_done"] == 3

    # A kill after the retry shards were renamed but before failed.jsonl was rewritten leaves the ids in both:
    # the next run keeps the shard rows, drops the stale failure lines and asks the engine for nothing.
    (out / "failed.jsonl").write_text("".join(json.dumps(f) + "\n" for f in first))
    engine.calls.clear()
    manifest = run_generate(cfg, progress=False)
    assert engine.calls == [] and failed_lines(out) == []
    assert rows_by_id(out) == reference and manifest["complete"]

    # A chunk redone from scratch (its part shard gone) takes its retry shard with it: no id twice.
    (out / "shards" / "part-00001.parquet").unlink()
    run_generate(cfg, progress=False)
    assert sorted(p.name for p in (out / "shards").glob("retry-*.parquet")) == ["retry-00000-001.parquet"]
    assert rows_by_id(out) == reference


def test_retry_failed_flag_retries_deterministic_failures(tiny_model_dir, tmp_path, engine):
    from recforge.cli import main

    out = tmp_path / "out"
    # 2 tokens cannot hold the JSON object: every row is truncated, a deterministic failure.
    cmd = ["generate", str(make_recipe(tmp_path, tiny_model_dir, 4, out, 2)), "sampling.max_tokens=2", "--no-progress"]
    main(cmd)
    assert {f["id"]: (f["reason"], f["attempts"]) for f in failed_lines(out)} == {i: ("truncated", 2) for i in "1234"}

    engine.calls.clear()
    main(cmd)  # a plain resume leaves deterministic failures alone
    assert engine.calls == []

    assert main([*cmd, "--retry-failed"]) == 0
    # At most a chunk's worth of failed rows per engine call on the transformers engine (chunk_size 2), each call
    # with its attempts (max_retries=1: two)
    assert engine.calls == [["1", "2"], ["1", "2"], ["3", "4"], ["3", "4"]]
    again = failed_lines(out)
    assert sorted(f["id"] for f in again) == ["1", "2", "3", "4"]  # each still exactly once
    # The attempt count goes on (3rd and 4th attempts): a retry draws new seeds instead of repeating the first two.
    assert {(f["reason"], f["attempts"]) for f in again} == {("truncated", 4)}
    assert {f["id"]: f["chunk"] for f in again} == {"1": 0, "2": 0, "3": 1, "4": 1}


def test_consecutive_engine_errors_stop_the_run_and_a_rerun_resumes(tiny_model_dir, tmp_path, engine, capsys):
    from recforge.cli import main

    out = tmp_path / "out"
    recipe = make_recipe(tmp_path, tiny_model_dir, 12, out, 4, sampling={"max_tokens": 48}, submit_rows=4,
                         max_consecutive_engine_errors=6)
    engine.fails = lambda rid: True  # the engine died
    assert main(["generate", str(recipe), "--no-progress"]) == 1
    # Chunk 0 (4 errors) is written; the 6th error in a row falls in chunk 1, which stays un-done; chunk 2 never ran.
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet"]
    assert [(f["id"], f["reason"]) for f in failed_lines(out)] == [(i, "engine_error") for i in "1234"]
    assert asked(engine) == {str(i) for i in range(1, 9)}
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recforge generate:")]
    assert len(err) == 1 and err[0].startswith(
        "recforge generate: stopped early: 6 rows in a row failed with an engine error (max_consecutive_engine_errors=6; "
        "last: engine_error: RuntimeError: CUDA error (injected)); 2 of 3 chunks are not done")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stopped"] == err[0].removeprefix("recforge generate: ") and not manifest["complete"]

    engine.calls.clear()
    engine.fails = lambda rid: False  # fixed: the rerun retries chunk 0's rows and runs chunks 1 and 2
    assert main(["generate", str(recipe), "--no-progress"]) == 0
    assert engine.calls[0] == ["1", "2", "3", "4"] and asked(engine) == {str(i) for i in range(1, 13)}
    got = rows_by_id(out)
    assert sorted(got, key=int) == [str(i) for i in range(1, 13)]
    assert not any(v.startswith("FAILED") for v in got.values())


def test_chunks_are_grouped_per_engine_call_on_vllm_only(tiny_model_dir, tmp_path, engine):
    import pyarrow.parquet as pq

    from recforge.generate.runner import submission_batches

    # vLLM schedules the rows of one call together: three resume chunks of 4 go in one call of 12
    assert submission_batches([0, 1, 2], [[1] * 4] * 3, 12) == [[0, 1, 2]]
    out = tmp_path / "out"
    cfg = load_recipe(GenerateConfig, make_recipe(tmp_path, tiny_model_dir, 12, out, 4, sampling={"max_tokens": 48},
                                                  submit_rows=12, max_retries=0))
    run_generate(cfg, progress=False)
    # the transformers engine gains nothing from it: one chunk a call, so each chunk is on disk as soon as it is
    # done (a kill loses one chunk at most, not the whole submission)
    assert engine.calls == [[str(i) for i in range(4 * k + 1, 4 * k + 5)] for k in range(3)]
    failed = failed_lines(out)
    for k in range(3):  # ...but still one shard per chunk, each holding exactly its own input rows
        ids = pq.read_table(out / "shards" / f"part-{k:05d}.parquet").column("id").to_pylist()
        ids += [f["id"] for f in failed if f["chunk"] == k]
        assert sorted(ids, key=int) == [str(i) for i in range(4 * k + 1, 4 * k + 5)]
    before = rows_by_id(out)

    (out / "shards" / "part-00001.parquet").unlink()  # as if killed before chunk 1's shard was renamed into place
    engine.calls.clear()
    run_generate(cfg, progress=False)
    assert engine.calls == [["5", "6", "7", "8"]]
    assert rows_by_id(out) == before
