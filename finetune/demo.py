"""The `make cpt` demo, and small corpora from the shipped samples for it and for the tests.

Story: a tiny model is first pre-trained briefly on goodbooks book text (its "general" knowledge),
then continually pre-trained on ESCI product titles + queries (the "domain"), once without and once
with goodbooks replay. `runs/cpt/demo_report.json` compares them: domain perplexity falls, and the
replay run keeps the goodbooks perplexity lower than the no-replay run (less forgetting).

The corpora are written in `recforge.records.corpus_schema()` so the same recipes run unchanged on
the data_recipes outputs (`recforge cpt finetune/recipes/cpt_esci_tiny.yaml data.train.esci.path=runs/data/esci/...`).
"""

from __future__ import annotations

from pathlib import Path

from recforge.io import atomic_write_json, write_parquet_atomic
from recforge.manifest import RunRecorder
from recforge.esci import read_esci
from recforge.readers import FileKey, RejectLog, SourceConfig, read_items
from recforge.runstate import output_lock
from recforge.splits import split_of

RECIPES = Path(__file__).resolve().parent / "recipes"


def esci_rows() -> list[dict]:
    """One row per product title and per query (each its own document)."""
    paths = tuple(f"sample://esci_us_titles/{f}.jsonl.gz" for f in ("queries", "products", "judgments"))
    # the shipped samples have no bad rows; a changed sample still cannot crash the demo
    queries, products, _ = read_esci(paths, paths, RejectLog())
    return ([_row("item", pid, f"product:{pid}", "esci_products", title) for pid, title in products.items()]
            + [_row("query", qid, f"query:{qid}", "esci_queries", text) for qid, text in queries.items()])


def goodbooks_rows(max_books: int | None = 3000) -> list[dict]:
    """One row per catalogue book: `Title by Author, Author (year).`"""
    src = SourceConfig(path="sample://goodbooks_10k_catalog/books.jsonl.gz", id="book_id",
                       fields={"title": "title", "authors": "authors", "year": "original_publication_year"})
    rows = []
    for b in read_items(src, RejectLog(), FileKey("goodbooks books"))[: max_books or None]:
        year, authors = b.fields.get("year"), b.fields.get("authors") or []
        text = f"{b.fields['title']} by {', '.join(authors)}" + (f" ({year})." if year else ".")
        rows.append(_row("book", b.item_id, f"book:{b.item_id}", "goodbooks", text))
    return rows


def _row(entity: str, entity_id: str, row_id: str, source: str, text: str) -> dict:
    """One-document corpus row, split by the project rule: CPT's eval rows are the other stages' eval ids."""
    return {"row_id": row_id, "source": source, "documents": [text], "doc_ids": [row_id], "text": text,
            "split": split_of(entity, entity_id), "meta": "{}"}


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
    out = Path(out)
    with output_lock(out, "cpt-demo"):
        return _run_demo(out, base_model, RunRecorder(out, "cpt-demo", None, seed=0))


def write_demo_corpora(folder: Path) -> dict[str, Path]:
    """The demo's corpora as a run of their own, finished before any CPT reads them: CPT refuses a corpus whose
    producing run is unfinished, and the demo's own manifest (one folder up) says running until the demo ends."""
    rec = RunRecorder(folder, "cpt-demo corpus", None, seed=0)
    corpora = write_sample_corpora(folder)
    for name, path in corpora.items():
        rec.add_output(name, path)
    rec.finish()
    return corpora


def _run_demo(out: Path, base_model: str | None, rec: RunRecorder) -> dict:
    from recforge.config import load_recipe
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    from .cpt import run_cpt
    from .cpt_config import CPTConfig
    from .forgetting import plot_curves

    corpora = write_demo_corpora(out / "corpus")
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
    curves = {f"{label}: {src}": rep["eval_loss"][src] for label, rep in reports.items() for src in rep["eval_loss"]}
    plot_curves(out / "demo_perplexity.png", [], curves, "perplexity", perplexity=True,
                title="ESCI CPT: without vs with goodbooks replay")
    rec.finish()  # the completion marker, last
    return summary
