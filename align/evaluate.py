"""Retrieval evaluation: Recall@k, NDCG@10, MRR@10 of held-out queries against a catalogue.

Metrics are computed here (a few lines of numpy) rather than with ST's InformationRetrievalEvaluator
because ESCI judgments are graded (exact 3 / substitute 2 / complement 1): NDCG uses the grades as
gains (2^g - 1), while Recall and MRR count a document as relevant from `relevant_min_grade` up.
`tests/test_align_data.py` checks NDCG against scikit-learn's `ndcg_score`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from recforge.io import atomic_write_json, atomic_write_text

from .pairs import RetrievalTask, ndcg_gain


# By hand, not a library (issue 26, measured on the 42 shipped held-out ESCI queries, MiniLM): ir-measures 0.4.3 (pulls
# pytrec-eval-terrier 0.5.11, a 0.3 MB wheel; numpy / scipy are here already) gives all four metrics with |diff| 0.0 and
# ranx 0.3.21 with 1.1e-16 (ranx pulls ir_datasets, fastparquet, lxml, seaborn, numba), but pytrec_eval takes integer
# grades and integer gains only ("Expected relevance to be integer"), while a judgment here is any number (grade_map).
def rank_metrics(ranked: list[list[str]], qrels: list[dict[str, float]], k_values: list[int],
                 relevant_min_grade: float = 1.0) -> dict[str, float]:
    """Mean metrics over queries. `ranked[q]` is doc ids best first; `qrels[q]` maps doc id -> grade."""
    sums: dict[str, float] = {f"recall@{k}": 0.0 for k in k_values}
    sums.update({"ndcg@10": 0.0, "mrr@10": 0.0})
    n = 0
    for docs, grades in zip(ranked, qrels):
        relevant = {d for d, g in grades.items() if g >= relevant_min_grade}
        if not relevant:
            continue
        n += 1
        for k in k_values:
            sums[f"recall@{k}"] += len(relevant.intersection(docs[:k])) / len(relevant)
        dcg = sum(ndcg_gain(grades.get(d, 0.0)) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
        ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:10]
        idcg = sum(ndcg_gain(g) / math.log2(i + 2) for i, g in enumerate(ideal))
        sums["ndcg@10"] += dcg / idcg if idcg > 0 else 0.0
        sums["mrr@10"] += next((1.0 / (i + 1) for i, d in enumerate(docs[:10]) if d in relevant), 0.0)
    return {key: (v / n if n else 0.0) for key, v in sums.items()} | {"queries": n}


def encode_texts(model, texts: list[str], prompt_name: str | None, batch_size: int) -> np.ndarray:
    prompt = prompt_name if prompt_name and prompt_name in (model.prompts or {}) else None
    return model.encode(texts, prompt_name=prompt, batch_size=batch_size, convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=False)


def evaluate_model(model, task: RetrievalTask, k_values: list[int], batch_size: int = 64) -> dict[str, float]:
    """Encode queries (prompt `query`) and the catalogue (prompt `document`, when the model has them) and rank."""
    doc_ids = list(task.corpus)
    q_ids = list(task.queries)
    docs = encode_texts(model, [task.corpus[d] for d in doc_ids], "document", batch_size)
    queries = encode_texts(model, [task.queries[q] for q in q_ids], "query", batch_size)
    scores = queries @ docs.T
    depth = max(max(k_values), 10)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    ranked = [[doc_ids[j] for j in row] for row in top]
    out = rank_metrics(ranked, [task.qrels[q] for q in q_ids], k_values, task.relevant_min_grade)
    for kind in sorted(set(task.query_kind.values())):
        # The same vectors, each kind ranked against its own candidates only (user -> tag among the tags, ...).
        rows = [i for i, q in enumerate(q_ids) if task.query_kind.get(q) == kind]
        cols = [j for j, d in enumerate(doc_ids) if d in task.kind_corpus.get(kind, set())]
        if not rows or not cols:
            continue
        sub_top = np.argsort(-scores[np.ix_(rows, cols)], axis=1, kind="stable")[:, :depth]
        per = rank_metrics([[doc_ids[cols[j]] for j in row] for row in sub_top],
                           [task.qrels[q_ids[i]] for i in rows], [10], task.relevant_min_grade)
        out.update({f"{kind}:ndcg@10": per["ndcg@10"], f"{kind}:recall@10": per["recall@10"]})
    return out


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    metrics = [m for m in next(iter(results.values())) if m != "queries"]
    lines = ["| metric | " + " | ".join(names) + (" | Δ |" if len(names) == 2 else " |"),
             "|---|" + "---:|" * (len(names) + (1 if len(names) == 2 else 0))]
    for m in metrics:
        vals = [results[n][m] for n in names]
        row = f"| {m} | " + " | ".join(f"{v:.4f}" for v in vals)
        if len(names) == 2:
            row += f" | {vals[1] - vals[0]:+.4f}"
        lines.append(row + " |")
    q = next(iter(results.values())).get("queries")
    lines.append(f"\n{q} held-out queries")
    return "\n".join(lines)


def bar_chart(results: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in next(iter(results.values())) if m != "queries" and ":" not in m]  # per-kind rows: table only
    x = np.arange(len(metrics))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(1.2 * len(metrics) + 2, 3.5))
    for i, (name, res) in enumerate(results.items()):
        ax.bar(x + i * width, [res[m] for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(results) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_report(results: dict[str, dict[str, float]], out_dir: Path, title: str, extra: dict | None = None) -> dict:
    """`retrieval_metrics.json`, `retrieval_metrics.md`, `retrieval_metrics.png` in out_dir."""
    out_dir = Path(out_dir)
    table = markdown_table(results)
    atomic_write_json(out_dir / "retrieval_metrics.json", {"title": title, "results": results, **(extra or {})})
    atomic_write_text(out_dir / "retrieval_metrics.md", f"# {title}\n\n{table}\n")
    bar_chart(results, out_dir / "retrieval_metrics.png", title)
    return {"json": str(out_dir / "retrieval_metrics.json"), "markdown": str(out_dir / "retrieval_metrics.md"),
            "png": str(out_dir / "retrieval_metrics.png"), "table": table}


def load_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def run_eval_retrieval(cfg) -> dict:
    """`recforge eval retrieval`: every model in `cfg.models` on the same held-out queries, side by side."""
    from recforge.manifest import RunRecorder

    from recforge.runstate import output_lock

    from .embed import checked_model_folder, load_model
    from .pairs import load_for_run

    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "eval retrieval"):
        # A hostile model folder (pickled weights, remote code) is refused before this run writes anything; a
        # missing one is reported when it is loaded, after the data's own errors.
        for name, path in cfg.models.items():
            if Path(path).is_dir():
                checked_model_folder(path, f"models.{name}")
        run = RunRecorder(out_dir, "eval retrieval", cfg, cfg.seed)
        data = load_for_run(cfg.data, cfg.split, run)
        results = {}
        for name, path in cfg.models.items():
            model = load_model(path, device=cfg.device, what=f"models.{name}")
            results[name] = evaluate_model(model, data.task, cfg.eval.k_values, cfg.eval.batch_size)
        report = write_report(results, out_dir, f"{data.task.name}: " + " vs ".join(results), {"models": cfg.models})
        run.add_output("retrieval_metrics", report["json"])
        run.extra["metrics"] = results
        run.finish()
        return report
