"""A direct LLM judgement as a CTR feature (issue 24): a `recforge generate` run of a choice-constrained task
(e.g. `audience_reception`: very poor .. excellent) -> one small vector per item.

The run samples each item several times (`sampling.n`), so the feature is the distribution of the answers over
the task's fixed choices plus their mean position on the scale (0 = first choice, 1 = last) and a coverage flag
(1 where the item was judged): for a five-point scale a 7-d vector. Items without a judgement get zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recforge.config import RecforgeError
from recforge.io import resolve_path


def judgement_choices(run_dir: Path) -> list[str]:
    """The task's choice list, from the run's resolved config (its prompt's `output.choices`)."""
    import yaml

    from recforge.prompts.templates import load_prompt

    cfg_path = run_dir / "resolved_config.yaml"
    if not cfg_path.is_file():  # a run made of data-parallel shards (`--shard i/N`): each shard folder has one
        cfg_path = next(iter(sorted(run_dir.glob("shard-*/resolved_config.yaml"))), cfg_path)
    if not cfg_path.is_file():
        raise RecforgeError(f"inputs.judgement: {run_dir} has no resolved_config.yaml (not a `recforge generate` run)")
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    spec = load_prompt(cfg["task"]).spec
    if spec.output.format != "choice" or not spec.output.choices:
        raise RecforgeError(f"inputs.judgement: task {cfg['task']!r} is not a choice-constrained task")
    return list(spec.output.choices)


def judgement_table(path: str) -> tuple[list[str], np.ndarray, dict]:
    """(item ids, (n, len(choices) + 2) float32 vectors, info) of a generate run folder."""
    from recforge.generations import read_run_outputs  # refuses an unfinished run in one line

    run_dir = resolve_path(path)
    choices = judgement_choices(run_dir)
    position = {c: i for i, c in enumerate(choices)}
    rows = read_run_outputs(run_dir).to_pylist()
    ids, vectors, answers = [], [], 0
    scale = max(1, len(choices) - 1)
    for row in rows:
        outs = [json.loads(o) for o in (row.get("outputs") or ([row["output"]] if row.get("output") else []))]
        picked = [position[o.strip()] for o in outs if isinstance(o, str) and o.strip() in position]
        if not picked:
            continue
        hist = np.bincount(picked, minlength=len(choices)).astype(np.float32) / len(picked)
        ids.append(str(row["id"]))
        vectors.append(np.r_[hist, np.float32(np.mean(picked) / scale), np.float32(1.0)])
        answers += len(picked)
    if not ids:
        raise RecforgeError(f"inputs.judgement: {run_dir} holds no answer among the choices {choices}")
    matrix = np.asarray(vectors, dtype=np.float32)
    info = {"run": str(run_dir), "choices": choices, "items": len(ids), "answers": answers,
            "answer_share": {c: round(float(matrix[:, i].mean()), 4) for i, c in enumerate(choices)},
            "mean_position": round(float(matrix[:, -2].mean()), 4),
            "position_std_over_items": round(float(matrix[:, -2].std()), 4)}
    return ids, matrix, info
