"""bench/demo_summary.py (`make demo`'s last step): every number comes from the stage's own file, beside its baseline; a stage that
did not run says so instead of showing a number."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import demo_summary  # noqa: E402
from demo_summary import main, summarise  # noqa: E402  (bench/demo_summary.py: an import error must fail)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_summary_places_each_stage_number_beside_its_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_summary, "PSEUDO_RESULTS", tmp_path / "no_pseudo_results.json")
    demo = tmp_path / "demo"
    write(demo / "cpt" / "report.json", {"sources": {"esci": {"before": {"loss": 5.0, "perplexity": 150.0},
                                                              "after": {"loss": 4.0, "perplexity": 60.0},
                                                              "perplexity_change": -0.6}}})
    write(demo / "tags" / "tag_eval.json", {"precision@5": 0.55, "books": 401, "failed_rows": 0,
                                            "popular_baseline": {"precision@5": 0.40},
                                            "model_used": {"name_or_path": "runs/demo/sft_tags/merged"}})
    write(demo / "tags" / "manifest.json", {"engine": {"kind": "vllm", "version": "0.32.0"}})
    write(demo / "ctr" / "verdict.json", {"rows": [
        {"variant": "ids_only", "kind": "model", "groups": {"warm": {"auc_mean": 0.70}, "new": {"auc_mean": 0.65}}},
        {"variant": "text_knowledge", "kind": "llm", "groups": {
            "warm": {"auc_mean": 0.72, "delta": 0.02, "ci_low": 0.01, "ci_high": 0.03},
            "new": {"auc_mean": 0.66, "delta": 0.01, "ci_low": -0.002, "ci_high": 0.022}}}]})
    rows = summarise(demo)["rows"]
    by = {(r["stage"], r["measure"].split(",")[0]): r for r in rows}
    cpt = by[("CPT", "esci held-out perplexity (lower is better)")]
    assert (cpt["result"], cpt["baseline"], cpt["change"]) == (60.0, 150.0, "-60.0 %")
    tags = by[("tags", "P@5 vs shelf tags")]
    assert (tags["result"], tags["baseline"], tags["engine"]) == (0.55, 0.40, "vllm 0.32.0")
    ctr = [r for r in rows if r["stage"] == "CTR" and not r.get("status")]
    assert [(r["result"], r["baseline"], r["change"]) for r in ctr] == [
        (0.72, 0.70, "warm +0.0200 [+0.0100, +0.0300]; new +0.0100 [-0.0020, +0.0220]")]
    # stages without files are "not run", never a number
    assert {r["stage"] for r in rows if r.get("status") == "not run"} == {"knowledge", "align"}
    empty = summarise(tmp_path / "empty")["rows"]  # no verdict.json: the CTR row says so
    assert "CTR" in {r["stage"] for r in empty} and all(r.get("status") == "not run" for r in empty)
    md = (demo / "summary.md").read_text()
    assert "| tags | P@5 vs shelf tags, 401 held-out books | 0.55 | 0.4 (the most popular training tags) |" in md
    assert (demo / "summary.png").stat().st_size > 0
    assert main([str(demo)]) == 0
    assert "0.72" in capsys.readouterr().out


def test_the_pseudo_query_row_is_the_committed_bench_measurement_beside_real_pairs(tmp_path):
    table = {"minilm_real": {"ndcg@10": {"mean": 0.64}}, "minilm_pseudo": {"ndcg@10": {"mean": 0.66}}}
    (tmp_path / "r.json").write_text(json.dumps({"table": table, "steps": {"generate": {"model": "qwen"}}}))
    [row] = demo_summary.pseudo_query_rows(tmp_path / "r.json")
    assert (row["result"], row["baseline"], row["change"], row["model"]) == (0.66, 0.64, "+0.0200", "qwen")
    assert demo_summary.pseudo_query_rows(tmp_path / "none.json")[0]["status"] == "not run"
