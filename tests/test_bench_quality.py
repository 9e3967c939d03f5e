"""bench/quality.py's table: goals judged on every seed (the worst one), CTR deltas paired by seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
quality = pytest.importorskip("quality")


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def cpt_report(general_after: float) -> dict:
    return {"sources": {"esci": {"before": {"perplexity": 100.0}, "after": {"perplexity": 70.0}},
                        "general": {"before": {"perplexity": 50.0}, "after": {"perplexity": general_after}}}}


def test_cpt_goal_is_missed_when_one_seed_misses(tmp_path):
    write(tmp_path / "seed0" / "cpt" / "report.json", cpt_report(51.0))  # +2 %
    write(tmp_path / "seed1" / "cpt" / "report.json", cpt_report(53.0))  # +6 %: this seed misses
    table = quality.cpt_table(tmp_path, [0, 1])
    assert table["esci"]["cpt_change"]["mean"] == pytest.approx(-0.30)
    assert table["goals"]["domain_minus_20pct"] == {"esci": True}
    assert table["goals"]["general_with_replay_within_plus_5pct"] is False
    assert table["general"]["cpt_noreplay"] is None  # that arm did not run: shown as not run, never filled in


def test_ctr_deltas_are_paired_by_seed(tmp_path):
    runs = [{"variant": v, "seed": s, "test_auc": auc} for v, s, auc in (
        ("ids_only", 0, 0.70), ("ids_only", 1, 0.72), ("knowledge", 0, 0.708), ("knowledge", 1, 0.724),
        ("item_text", 0, 0.70), ("item_text", 1, 0.72))]
    write(tmp_path / "ctr_goodbooks" / "report.json", {"status": "done", "runs": runs})
    table = quality.ctr_table(tmp_path)
    assert table["goodbooks"]["knowledge_delta"]["values"] == pytest.approx([0.008, 0.004])
    assert table["goodbooks"]["goals"]["knowledge_ge_ids_plus_0.005_every_seed"] is False  # seed 1: +0.004
    assert table["movielens"] == {"status": "not run"}
