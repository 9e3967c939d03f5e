"""The run-folder contracts every writing command relies on (recforge.runstate): one writer per folder, a
manifest that says whether the run finished; and input-content digests for resume checks (recforge.run_contract)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from recforge.config import RecforgeError
from recforge.manifest import RunRecorder
from recforge.runstate import (
    LOCK_NAME,
    output_lock,
    producer_of,
    require_complete,
)

HOLD = textwrap.dedent(
    """
    import sys, time
    from recforge.runstate import output_lock
    with output_lock(sys.argv[1], "generate"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """A second real process that holds the folder's lock until it exits."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = hold_lock(tmp_path, 30)
    try:
        with pytest.raises(RecforgeError) as err:
            with output_lock(tmp_path, "generate"):
                pass
        assert f"pid {proc.pid}" in str(err.value) and "generate" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    proc = hold_lock(tmp_path, 30)
    proc.kill()
    proc.wait()
    with output_lock(tmp_path, "data"):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["command"] == "data"
    assert f"stale lock" in capsys.readouterr().err
    # a lock released cleanly is not reported as stale
    with output_lock(tmp_path, "data"):
        pass
    assert "stale" not in capsys.readouterr().err


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(ValueError):
        with output_lock(tmp_path, "cpt"):
            raise ValueError("boom")
    with output_lock(tmp_path, "cpt"):
        pass


def test_manifest_says_running_until_finish(tmp_path):
    run = RunRecorder(tmp_path / "run", "data", None)
    corpus = tmp_path / "run" / "items"
    corpus.mkdir()
    (corpus / "train-00000-of-00001.parquet").write_bytes(b"x")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(RecforgeError, match=r"unfinished `recforge data` run .*--allow-partial"):
        require_complete(corpus / "train-00000-of-00001.parquet", "corpus")
    assert "unfinished" in require_complete(corpus, "corpus", allow_partial=True)
    run.finish()
    assert require_complete(corpus, "corpus") is None


def test_incomplete_generate_run_is_refused_and_foreign_files_pass(tmp_path):
    run = RunRecorder(tmp_path / "gen", "generate", None)
    run.extra["complete"] = False
    run.finish()
    with pytest.raises(RecforgeError, match="complete: false"):
        require_complete(tmp_path / "gen", "generate run")
    own = tmp_path / "mine" / "a" / "b" / "c" / "d"
    own.mkdir(parents=True)
    assert producer_of(own) is None
    assert require_complete(own, "corpus") is None


def test_input_digests_follow_content_not_name(tmp_path):
    from recforge.run_contract import changed_inputs, make

    f = tmp_path / "input.jsonl"
    f.write_text('{"id": 1}\n')
    before = make("job", {"input.path": f}, {}, {})
    time.sleep(0.01)
    f.write_text('{"id": 2}\n')
    after = make("job", {"input.path": f}, {}, {})
    assert changed_inputs(before, after) == ["input.path"]
    assert changed_inputs(after, make("job", {"input.path": f}, {}, {})) == []
    assert changed_inputs(after, make("job", {"input.path": tmp_path / "gone"}, {}, {})) == []  # its reader says
