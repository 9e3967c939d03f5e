"""The `make cpt` demo, and small corpora from the shipped samples for it and for the tests.

Story: a tiny model is first pre-trained briefly on goodbooks book text (its "general" knowledge),
then continually pre-trained on ESCI product titles + queries (the "domain"), once without and once
with goodbooks replay. `runs/cpt/demo_report.json` compares them: domain perplexity falls, and the
replay run keeps the goodbooks perplexity lower than the no-replay run (less forgetting).

The corpora are written in `recforge.records.corpus_schema()` so the same recipes run unchanged on
the data_recipes outputs (`recforge cpt finetune/recipes/cpt_esci_tiny.yaml data.train.esci.path=runs/data/esci/...`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from recforge.io import atomic_write_json, open_text, write_parquet_atomic

RECIPES = Path(__file__).resolve().parent / "recipes"


def _is_eval(key: str, percent: int = 10) -> bool:
    """A stable 10% hold-out by id hash (the same rows on every machine)."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < percent


def _jsonl(path: str):
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def esci_rows() -> list[dict]:
    """One row per product title and per query (each its own document)."""
    rows = []
    for p in _jsonl("sample://esci_us_titles/products.jsonl.gz"):
        pid = f"product:{p['product_id']}"
        rows.append(_row(pid, "esci_products", [p["product_title"]], [pid]))
    for q in _jsonl("sample://esci_us_titles/queries.jsonl.gz"):
        qid = f"query:{q['query_id']}"
        rows.append(_row(qid, "esci_queries", [q["query"]], [qid]))
    return rows


def goodbooks_rows(max_books: int | None = 3000) -> list[dict]:
    """One row per catalogue book: `Title by Author, Author (year).`"""
    rows = []
    for b in _jsonl("sample://goodbooks_10k_catalog/books.jsonl.gz"):
        year = b.get("original_publication_year")
        text = f"{b['title']} by {', '.join(b.get('authors') or [])}" + (f" ({year})." if year else ".")
        bid = f"book:{b['book_id']}"
        rows.append(_row(bid, "goodbooks", [text], [bid]))
        if max_books and len(rows) >= max_books:
            break
    return rows


def _row(row_id: str, source: str, docs: list[str], doc_ids: list[str]) -> dict:
    return {"row_id": row_id, "source": source, "documents": docs, "doc_ids": doc_ids, "text": "\n".join(docs),
            "split": "eval" if _is_eval(row_id) else "train", "meta": "{}"}


def write_corpus(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa

    from recforge.records import corpus_schema

    table = pa.Table.from_pylist(rows, schema=corpus_schema())
    write_parquet_atomic(table, path)
    return Path(path)


def write_sample_corpora(out_dir: str | Path, max_books: int | None = 3000) -> dict[str, Path]:
    """`esci.parquet` and `goodbooks.parquet` (split column: train / eval) under `out_dir`."""
    out = Path(out_dir)
    return {
        "esci": write_corpus(esci_rows(), out / "esci.parquet"),
        "goodbooks": write_corpus(goodbooks_rows(max_books), out / "goodbooks.parquet"),
    }


def run_cpt_demo(out: str | Path = "runs/cpt", base_model: str | None = None) -> dict:
    """Base tiny model -> goodbooks pre-training -> ESCI CPT without and with replay; a comparison report."""
    from recforge.config import load_recipe
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    from .cpt import run_cpt
    from .cpt_config import CPTConfig
    from .forgetting import plot_curves

    from recforge.manifest import RunRecorder

    out = Path(out)
    rec = RunRecorder(out, "cpt-demo", None, seed=0)
    corpora = write_sample_corpora(out / "corpus")
    for name, path in corpora.items():
        rec.add_output(f"corpus:{name}", path)
    if base_model is None:
        base_model = str(out / "base-model")
        if not (Path(base_model) / "config.json").is_file():
            build_tiny_model(TinyModelConfig(), base_model)

    def recipe(name: str, overrides: list[str]) -> CPTConfig:
        return load_recipe(CPTConfig, RECIPES / name, overrides)

    corpus = [f"data.eval.esci.path={out}/corpus/esci.parquet", f"data.eval.goodbooks.path={out}/corpus/goodbooks.parquet"]
    pre = recipe("cpt_demo_pretrain_tiny.yaml", [f"model.path={base_model}", f"out_dir={out}/pretrain",
                                                  f"data.train.goodbooks.path={out}/corpus/goodbooks.parquet", *corpus])
    run_cpt(pre)
    start = f"model.path={out}/pretrain/model"
    reports = {}
    for label, name, extra in (
        ("no_replay", "cpt_esci_tiny.yaml", []),
        ("replay", "cpt_esci_replay_tiny.yaml", [f"data.train.goodbooks_replay.path={out}/corpus/goodbooks.parquet"]),
    ):
        cfg = recipe(name, [start, f"out_dir={out}/esci_{label}", f"data.train.esci.path={out}/corpus/esci.parquet",
                            *corpus, *extra])
        reports[label] = run_cpt(cfg)

    summary = {
        label: {src: {"before": r["before"]["perplexity"], "after": r["after"]["perplexity"],
                      "change": r["perplexity_change"]} for src, r in rep["sources"].items()}
        for label, rep in reports.items()
    }
    summary["checks"] = {
        "domain_perplexity_fall_no_replay": -summary["no_replay"]["esci"]["change"],
        "domain_perplexity_fall_replay": -summary["replay"]["esci"]["change"],
        "domain_fall_at_least_30pct": -summary["replay"]["esci"]["change"] >= 0.30
        and -summary["no_replay"]["esci"]["change"] >= 0.30,
        "replay_keeps_goodbooks_lower": summary["replay"]["goodbooks"]["after"] < summary["no_replay"]["goodbooks"]["after"],
    }
    atomic_write_json(out / "demo_report.json", summary)
    rec.add_output("demo_report", out / "demo_report.json")
    rec.extra["demo"] = summary
    rec.finish()
    curves = {f"{label}: {src}": rep["eval_loss"][src] for label, rep in reports.items() for src in rep["eval_loss"]}
    plot_curves(out / "demo_perplexity.png", [], curves, "perplexity", perplexity=True,
                title="ESCI CPT: without vs with goodbooks replay")
    return summary
