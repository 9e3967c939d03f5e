"""`recforge eval ctr RECIPE`: does the knowledge recforge produces show up as CTR AUC?

One run: behaviour log -> guarded, user-split CTR samples (optionally a new-item split: held-out items are never a
training / validation target) -> dense features (item text, the user's prompt-only history text, generated
knowledge encoded by the text encoder, a generated choice judgement as a small vector) -> every variant through the
KAR or the MLP adaptor, each tuned with the same fixed budget on the validation users, over several seeds ->
`report.json`, `report.md` and `auc.png`, plus the verdict (`verdict.{json,md,png}`, align/ctr/verdict.py): the
logistic-regression and popularity floors, each variant's warm- and new-target AUC, its paired delta to the tuned
IDs-only model with a bootstrap interval over test users, the chosen settings and the cost of every variant.

This module reads the inputs, builds the samples and runs the steps: `dense_inputs.py` (the encoded features),
`variants.py` (tuning and training every variant, cached), `report.py` (the report, the verdict and its goals);
BAHE / LLM-CTR and LARR backbones run their own variants (`bahe.py`, `larr.py`). `recforge export-features` is
`run_export_features`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recforge.align.ctr.config import CTRRecipe, ExportFeaturesRecipe
from recforge.align.ctr.data import build_ctr_data, render_template
from recforge.align.ctr.dense_inputs import TextEncoder
from recforge.align.ctr.report import build_verdict, markdown_table, model_name, plot_auc, summarise, verdict_text
from recforge.align.ctr.variants import run_text_variants
from recforge.config import RecforgeError
from recforge.io import atomic_write_json, atomic_write_text, resolve_path, sha256_file
from recforge.manifest import RunRecorder
from recforge.readers import RejectLog, read_interactions, read_items


def _missing_inputs(cfg: CTRRecipe) -> list[str]:
    sources = [cfg.inputs.interactions, cfg.inputs.items] + ([cfg.inputs.users] if cfg.inputs.users else [])
    return [s.path for s in sources if not resolve_path(s.path).is_file()]


def read_inputs(cfg: CTRRecipe, rejects_path: Path | None, run: RunRecorder | None = None):
    """The recipe's interactions, items and (optional) user profiles, bad rows quarantined -> (events, items, profiles)."""
    rejects = RejectLog(rejects_path)
    events = read_interactions(cfg.inputs.interactions, rejects, "inputs.interactions")
    items = read_items(cfg.inputs.items, rejects, "inputs.items")
    profiles = users = None
    if cfg.inputs.users is not None:
        users = read_items(cfg.inputs.users, rejects, "inputs.users")  # a profile is an Item-shaped record
        profiles = {u.item_id: dict(u.fields) for u in users}
    rejects.close()
    if run is not None:
        run.add_input(cfg.inputs.interactions.path, "interactions", rows=events.height)
        run.add_input(cfg.inputs.items.path, "items", rows=len(items))
        if users is not None:
            run.add_input(cfg.inputs.users.path, "users", rows=len(users))
        run.rejects.update(rejects.counts)
    return events, items, profiles


def ctr_data(cfg: CTRRecipe, events, items):
    """Guarded, user-split samples (the one split every CTR variant uses), subsampled where the recipe asks."""
    data = build_ctr_data(events, items, positive_threshold=cfg.labels.positive_threshold,
                          max_prompt_items=cfg.guard.max_prompt_items, history_length=cfg.model.history_length,
                          rule=cfg.split, valid_percent=cfg.valid_percent, new_items=cfg.new_items.enabled,
                          new_item_history=cfg.new_items.history)
    limit_samples(data, cfg.train)
    if min(len(s) for s in data.splits.values()) == 0:
        raise RecforgeError(f"{cfg.name}: a split has no samples ({data.stats['samples']}); too few users or events")
    return data


def run_ctr(cfg: CTRRecipe) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    missing = _missing_inputs(cfg)
    if missing and cfg.inputs.skip_if_missing:
        report = {"name": cfg.name, "status": "skipped", "reason": f"input files absent: {', '.join(missing)}"}
        print(f"[{cfg.name}] skipped: {report['reason']}")
        return report
    run = RunRecorder(out, "eval ctr", cfg, seed=cfg.seeds[0])
    machine = machine_state()
    # one run's rejects: a rerun starts the file afresh (the manifest counts this run's rejects)
    (out / "rejects.jsonl").unlink(missing_ok=True)
    events, items, profiles = read_inputs(cfg, out / "rejects.jsonl", run)
    data = ctr_data(cfg, events, items)
    print(f"[{cfg.name}] samples {data.stats['samples']}, prompt-only events {data.stats['prompt_only_events']}")

    def log(result: dict) -> None:
        print(f"[{cfg.name}] {result['variant']:<16} {result['adaptor'] or '-':<4} seed {result['seed']}: AUC "
              f"{result['test_auc']:.4f} logloss {result['test_logloss']:.4f} (best epoch {result['best_epoch']})")

    by_id = {i.item_id: i for i in items}
    if cfg.model.backbone in ("bahe", "llm_ctr"):
        from recforge.align.ctr.bahe import run_bahe_variants

        results, feature_report = run_bahe_variants(cfg, data, by_id, out, log)
        order = ["ids_only", "bahe", "llm_ctr"]
    elif cfg.model.scene == "larr":
        from recforge.align.ctr.larr import run_larr_variants

        results, feature_report = run_larr_variants(cfg, data, by_id, profiles, out, log)
        order = list(cfg.model.larr.variants)
    else:
        results, feature_report = run_text_variants(cfg, data, items, profiles, run, out, log)
        order = list(cfg.variants)
    probs = {(r["variant"], r["adaptor"], r["seed"]): r.pop("test_probs") for r in results if "test_probs" in r}
    rows = summarise(results, order)
    title = f"{cfg.name}: {model_name(cfg)} test AUC by variant"
    table = markdown_table(rows, title)
    report = {"name": cfg.name, "status": "done", "backbone": cfg.model.backbone, "data": data.stats,
              "features": feature_report, "summary": rows, "runs": results}
    if probs:  # DIN / DCN with text features: floors, tuned baseline, paired intervals, warm / new, cost
        from recforge.align.ctr.verdict import write_verdict

        verdict = build_verdict(cfg, data, results, probs, feature_report, {**machine, **machine_state("end")},
                                out / "trainings")
        report["verdict"] = verdict
        table += "\n" + verdict_text(verdict)
        write_verdict(verdict, out)
        run.add_output("verdict", out / "verdict.json")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", table)
    plot_auc(rows, out / "auc.png", title)
    run.add_output("report", out / "report.json")
    run.extra.update({"ctr_data": data.stats, "features": feature_report})
    run.finish()
    print(table)
    return report


def machine_state(when: str = "start") -> dict:
    """Load average and threads, so a time in the report can be read against how busy the machine was."""
    import os

    import torch

    load = os.getloadavg()
    return {f"load_average_1min_{when}": round(load[0], 2), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def limit_samples(data, train_cfg) -> None:
    """`train.max_train_samples` / `max_eval_samples`: fixed random subsets, so LLM backbones fit a few cores."""
    from recforge.align.ctr.data import subsample

    limits = {"train": train_cfg.max_train_samples, "valid": train_cfg.max_eval_samples, "test": train_cfg.max_eval_samples}
    if all(v is None for v in limits.values()):
        return
    data.stats["samples_before_subsampling"] = {k: len(v) for k, v in data.splits.items()}
    data.splits = {k: subsample(v, limits[k], seed=len(k)) for k, v in data.splits.items()}
    data.stats["samples"] = {k: len(v) for k, v in data.splits.items()}


def run_export_features(cfg: ExportFeaturesRecipe) -> dict:
    out = Path(cfg.out_dir)
    run = RunRecorder(out, "export-features", cfg)
    rejects = RejectLog(out / "rejects.jsonl")
    records = read_items(cfg.source, rejects, "source")
    rejects.close()
    run.add_input(cfg.source.path, "source", rows=len(records))
    run.rejects.update(rejects.counts)
    texts = {r.item_id: render_template(cfg.text_template, r.fields) for r in records}
    encoder = TextEncoder(cfg.embedding)
    contract = encoder.write_table(out, cfg.name, cfg.entity, texts, {"source": sha256_file(resolve_path(cfg.source.path))})
    run.add_output("vectors", out / "vectors.parquet", rows=contract["rows"], version=contract["version"])
    run.finish()
    print(json.dumps({k: contract[k] for k in ("version", "rows", "dimension", "normalized")}, indent=2))
    return contract
