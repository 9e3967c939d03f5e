"""A full disk (ENOSPC) ends a command with one line naming the file (exit 1), and what it left is not finished.

The disk is a real one: a 48 KiB tmpfs mounted for the test (root only; skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recforge.config import RecforgeError
from recforge.runstate import require_complete

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_data_on_a_full_disk_is_one_line_and_unfinished(tiny_disk):
    out = tiny_disk / "goodbooks"
    proc = subprocess.run([sys.executable, "-m", "recforge", "data", str(REPO / "data_recipes/recipes/goodbooks.yaml"),
                           f"out_dir={out}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "no space left" in lines[0] and str(out) in lines[0]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(RecforgeError, match="unfinished"):
        require_complete(out / "items", "corpus")
