"""bench/quality.py's table: goals judged on every seed (the worst one), CTR deltas paired by seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402  (bench/quality.py: an import error must fail, not skip)


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


def verdict_row(variant: str, kind: str, warm: tuple | None, new: tuple | None) -> dict:
    def group(g):
        if g is None:
            return {"auc_mean": 0.75, "delta": None}
        return {"auc_mean": 0.75 + g[0], "auc_std": 0.001, "delta": g[0], "ci_low": g[1], "ci_high": g[2]}
    return {"variant": variant, "kind": kind, "seeds": 3, "groups": {"warm": group(warm), "new": group(new)},
            "cost": {"total_cpu_hours": 0.01}}


def test_ctr_rows_come_from_the_verdict_and_mark_only_intervals_that_exclude_zero(tmp_path):
    verdict = {"rows": [verdict_row("ids_only", "model", None, None),
                        verdict_row("item_text", "model", (0.01, 0.004, 0.016), (0.002, -0.003, 0.007)),
                        verdict_row("item_knowledge", "llm", (-0.004, -0.008, -0.001), (0.03, 0.01, 0.05))],
               "goals": [{"goal": "tuned IDs-only DIN >= logistic-regression floor (warm targets)", "met": True,
                          "detail": "DIN 0.76 vs LR 0.75"}]}
    write(tmp_path / "ctr_goodbooks" / "verdict.json", verdict)
    table = quality.ctr_table(tmp_path)
    assert table["movielens"] == {"status": "not run"}
    rows = {r["variant"]: r for r in table["goodbooks"]["rows"]}
    assert rows["item_knowledge"]["new"]["delta"] == pytest.approx(0.03)
    cells = {r["variant"]: r for r in table["goodbooks"]["rows"]}
    assert quality._delta_cell(cells["item_text"]["warm"]).endswith("✔")
    assert not quality._delta_cell(cells["item_text"]["new"]).endswith("✔")  # [-0.003, +0.007] includes 0
    assert quality._delta_cell(cells["item_knowledge"]["warm"]).endswith("✔")  # below 0, also excludes it
    assert quality._delta_cell(cells["ids_only"]["warm"]) == "—"  # the baseline itself


def test_align_rows_come_from_the_align_pseudo_table_and_goals_use_its_means(tmp_path):
    def cell(mean):
        return {"ndcg@10": {"mean": mean, "sd": 0.01, "n": 3}}
    table = {"smollm2_untuned": cell(0.25), "smollm2_real": cell(0.40), "smollm2_cpt_untuned": cell(0.30),
             "smollm2_cpt_real": cell(0.38), "minilm_untuned": cell(0.60), "minilm_real": cell(0.64)}
    write(tmp_path / "align_pseudo.json", {"table": table})
    rows = quality.align_table(tmp_path / "align_pseudo.json")
    assert rows["smollm2_real"]["mean"] == 0.40 and rows["minilm_untuned"]["mean"] == 0.60
    assert rows["goals"] == {"aligned_smollm2_ge_untuned_minilm": False, "cpt_aligned_ge_base_aligned": False}
    assert quality.align_table(tmp_path / "missing.json") == {"status": "not run"}
    assert "| SmolLM2 CPT'd then aligned | 0.3800" in quality.markdown(
        {"seeds": [0], "engine": "x", "run_seconds": 0, "cpt": {}, "relevance": {"macro_f1": None, "accuracy": None,
         "majority_baseline": {}, "n_eval": 0, "goals": {"macro_f1_ge_0.35": None}},
         "tags": {"sft_p@5": None, "sft_r@5": None, "zero_shot_p@5": None, "popular_baseline_p@5": None, "books": 0,
                  "goals": {"p@5_ge_0.61": None}}, "align": rows, "ctr": {}})
