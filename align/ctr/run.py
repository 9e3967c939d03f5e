"""`recforge eval ctr RECIPE`: does the knowledge recforge produces show up as CTR AUC?

One run: behaviour log -> guarded, user-split CTR samples -> text features (item text, the user's
prompt-only history text, generated knowledge) encoded into versioned feature tables -> every
variant through the KAR and the MLP adaptor over several seeds -> `report.json`, `report.md`
and `auc.png`, each variant's delta over IDs-only with its spread across seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from recforge.align.ctr.config import CTRRecipe, EmbeddingConfig, ExportFeaturesRecipe
from recforge.align.ctr.data import build_ctr_data, item_texts, render_template, user_history_texts
from recforge.align.ctr.train import DenseInput, train_ctr
from recforge.align.ctr.features import FeatureExpectation, align_to_ids, load_feature_table, write_feature_table
from recforge.config import RecforgeError
from recforge.data_recipes.readers import RejectLog, read_interactions, read_items
from recforge.io import atomic_write_json, atomic_write_text, resolve_path, sha256_file
from recforge.manifest import RunRecorder


def embedding_model_path(cfg: EmbeddingConfig) -> str:
    if cfg.model == "minilm":
        from recforge.models import minilm_path

        return str(minilm_path())
    return cfg.model


class TextEncoder:
    """A SentenceTransformer loaded once per run; what a ranking team would load from align's export."""

    def __init__(self, cfg: EmbeddingConfig):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.model_path = embedding_model_path(cfg)
        self.model = SentenceTransformer(self.model_path, device="cpu")
        if cfg.max_seq_length:
            self.model.max_seq_length = cfg.max_seq_length

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.cfg.batch_size, normalize_embeddings=self.cfg.normalize,
                                 convert_to_numpy=True, show_progress_bar=len(texts) > 2000)

    def write_table(self, out_dir: Path, name: str, entity: str, texts: dict[str, str], sources: dict[str, str]) -> dict:
        """Encode and write a table, unless `out_dir` already holds one of these exact texts from this model."""
        cached = self.cached_table(out_dir, texts)
        if cached is not None:
            print(f"[features] {name}: reusing {out_dir} ({cached['version']})")
            return cached
        ids = sorted(texts)
        vectors = self.encode([texts[i] for i in ids])
        return write_feature_table(out_dir, name=name, entity=entity, ids=ids, vectors=vectors, model=self.model_path,
                                   normalized=self.cfg.normalize, source_hashes=sources,
                                   extra={"text_sha256": _texts_hash(texts), "max_seq_length": self.model.max_seq_length})

    def cached_table(self, out_dir: Path, texts: dict[str, str]) -> dict | None:
        from recforge.align.ctr.features import CONTRACT_FILE, model_revision

        path = Path(out_dir) / CONTRACT_FILE
        if not path.is_file():
            return None
        contract = json.loads(path.read_text(encoding="utf-8"))
        same = (contract.get("text_sha256") == _texts_hash(texts)
                and contract.get("model", {}).get("revision") == model_revision(self.model_path)
                and contract.get("normalized") == self.cfg.normalize
                and contract.get("max_seq_length") == self.model.max_seq_length)
        return contract if same else None

    def expectation(self, entity: str) -> FeatureExpectation:
        return FeatureExpectation(dimension=self.model.get_embedding_dimension(), model=self.model_path,
                                  normalized=self.cfg.normalize, entity=entity)


def _texts_hash(texts: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(texts):
        h.update(f"{key}\t{texts[key]}\n".encode())
    return h.hexdigest()


def knowledge_texts(path: str) -> dict[str, dict[str, str]]:
    """generate's features table -> {"item": {id: text}, "user": {id: text}} (knowledge, summary, tags joined)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = resolve_path(path)
    files = sorted(root.glob("**/*.parquet")) if root.is_dir() else [root]
    if not files:
        raise RecforgeError(f"inputs.knowledge: no .parquet file in {root} (expected generate-export's features table)")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    if "entity_type" not in table.column_names or "entity_id" not in table.column_names:
        raise RecforgeError(f"inputs.knowledge: {root} has no entity_type / entity_id columns (columns: {table.column_names})")
    out: dict[str, dict[str, str]] = {"item": {}, "user": {}}
    for row in table.to_pylist():
        parts = [row.get("knowledge") or "", row.get("summary") or ""]
        if row.get("tags"):
            parts.append("Tags: " + ", ".join(row["tags"]))
        text = " ".join(p for p in parts if p).strip()
        if text and row.get("entity_type") in out:
            out[row["entity_type"]][str(row["entity_id"])] = text
    return out


def _missing_inputs(cfg: CTRRecipe) -> list[str]:
    sources = [cfg.inputs.interactions, cfg.inputs.items] + ([cfg.inputs.users] if cfg.inputs.users else [])
    return [s.path for s in sources if not resolve_path(s.path).is_file()]


def build_dense_inputs(cfg: CTRRecipe, data, items, profiles, run: RunRecorder, out: Path) -> tuple[dict[str, DenseInput], dict]:
    """Encode each text feature into a feature table, reload it through its contract, align to the samples."""
    encoder = TextEncoder(cfg.embedding)
    needed = {name for names in cfg.variants.values() for name in names}
    source_hashes = {e["name"]: e.get("sha256", "") for e in run.inputs if e.get("name")}
    texts: dict[str, tuple[str, dict[str, str]]] = {}
    if "item_text" in needed:
        texts["item_text"] = ("item", item_texts(items, cfg.text.item_template))
    if "user_text" in needed:
        texts["user_text"] = ("user", user_history_texts(
            data.prompt_events, {i.item_id: i for i in items}, user_template=cfg.text.user_template,
            history_item_template=cfg.text.history_item_template, max_history_items=cfg.text.max_history_items,
            profiles=profiles, profile_template=cfg.text.profile_template))
    skipped: dict[str, str] = {}
    if needed & {"item_knowledge", "user_knowledge"}:
        path = cfg.inputs.knowledge
        if path and resolve_path(path).exists():
            know = knowledge_texts(path)
            texts["item_knowledge"] = ("item", know["item"])
            texts["user_knowledge"] = ("user", know["user"])
            source_hashes["knowledge"] = _texts_hash({**know["item"], **{f"u:{k}": v for k, v in know["user"].items()}})
        else:
            reason = "no generated knowledge table (inputs.knowledge unset or absent): run the generate stage first"
            skipped.update({"item_knowledge": reason, "user_knowledge": reason})

    user_ids = sorted({u for s in data.splits.values() for u in s.user_ids})
    dense, coverage = {}, {}
    for name, (entity, by_id) in texts.items():
        if not by_id:
            skipped[name] = f"the {name} table is empty"
            continue
        table_dir = out / "features" / name
        encoder.write_table(table_dir, name, entity, by_id, source_hashes)
        ids, vectors, contract = load_feature_table(table_dir, encoder.expectation(entity))
        needed_ids = data.item_ids if entity == "item" else user_ids
        matrix, cov = align_to_ids(name, ids, vectors, needed_ids)
        coverage[name] = {**cov.to_dict(), "version": contract["version"]}
        padded = np.vstack([np.zeros((1, matrix.shape[1]), np.float32), matrix])  # row 0 = padding / unknown
        rows = {u: i + 1 for i, u in enumerate(user_ids)} if entity == "user" else None
        dense[name] = DenseInput(name, entity, padded, rows)
    return dense, {"coverage": coverage, "skipped_inputs": skipped}


def summarise(results: list[dict], variants: dict[str, list[str]]) -> list[dict]:
    """Mean and spread per (variant, adaptor); delta over IDs-only paired by seed."""
    base = {r["seed"]: r for r in results if r["variant"] == "ids_only"}
    rows = []
    keys = sorted({(r["variant"], r["adaptor"]) for r in results}, key=lambda k: (list(variants).index(k[0]), str(k[1])))
    for variant, adaptor in keys:
        runs = [r for r in results if r["variant"] == variant and r["adaptor"] == adaptor]
        auc = np.array([r["test_auc"] for r in runs])
        ll = np.array([r["test_logloss"] for r in runs])
        delta = np.array([r["test_auc"] - base[r["seed"]]["test_auc"] for r in runs if r["seed"] in base])
        rows.append({
            "variant": variant, "adaptor": adaptor or "-", "seeds": len(runs),
            "auc_mean": float(auc.mean()), "auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
            "logloss_mean": float(ll.mean()), "logloss_std": float(ll.std(ddof=1)) if len(ll) > 1 else 0.0,
            "delta_auc_mean": float(delta.mean()) if len(delta) else None,
            "delta_auc_std": float(delta.std(ddof=1)) if len(delta) > 1 else 0.0,
        })
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| variant | adaptor | seeds | AUC (mean ± sd) | logloss (mean ± sd) | ΔAUC vs IDs-only (mean ± sd) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        no_delta = r["variant"] == "ids_only" or r["delta_auc_mean"] is None  # IDs-only is the base, or was not run
        delta = "—" if no_delta else f"{r['delta_auc_mean']:+.4f} ± {r['delta_auc_std']:.4f}"
        lines.append(f"| {r['variant']} | {r['adaptor']} | {r['seeds']} | {r['auc_mean']:.4f} ± {r['auc_std']:.4f} | "
                     f"{r['logloss_mean']:.4f} ± {r['logloss_std']:.4f} | {delta} |")
    return "\n".join(lines) + "\n"


def plot_auc(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\n{r['adaptor']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["auc_mean"] for r in rows], yerr=[r["auc_std"] for r in rows], capsize=4,
           color=["#888" if r["variant"] == "ids_only" else "#3b7dd8" if r["adaptor"] == "kar" else "#e08a2c" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    lo = min(r["auc_mean"] - r["auc_std"] for r in rows)
    hi = max(r["auc_mean"] + r["auc_std"] for r in rows)
    ax.set_ylim(lo - 0.01, hi + 0.005)
    ax.set_ylabel("test AUC (mean ± sd over seeds)")
    ax.set_title(title)
    fig.tight_layout()
    with_tmp = path.with_suffix(".tmp.png")
    fig.savefig(with_tmp, dpi=120)
    plt.close(fig)
    with_tmp.replace(path)


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
                          rule=cfg.split, valid_percent=cfg.valid_percent)
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
    run = RunRecorder(out, "eval ctr", cfg, seed=cfg.seeds[0] if cfg.seeds else None)
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
    rows = summarise(results, order)
    title = f"{cfg.name}: {_model_name(cfg)} test AUC by variant"
    table = markdown_table(rows, title)
    report = {"name": cfg.name, "status": "done", "backbone": cfg.model.backbone, "data": data.stats,
              "features": feature_report, "summary": rows, "runs": results}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", table)
    plot_auc(rows, out / "auc.png", title)
    run.add_output("report", out / "report.json")
    run.extra.update({"ctr_data": data.stats, "features": feature_report})
    run.finish()
    print(table)
    return report


def limit_samples(data, train_cfg) -> None:
    """`train.max_train_samples` / `max_eval_samples`: fixed random subsets, so LLM backbones fit a few cores."""
    from recforge.align.ctr.data import subsample

    limits = {"train": train_cfg.max_train_samples, "valid": train_cfg.max_eval_samples, "test": train_cfg.max_eval_samples}
    if all(v is None for v in limits.values()):
        return
    data.stats["samples_before_subsampling"] = {k: len(v) for k, v in data.splits.items()}
    data.splits = {k: subsample(v, limits[k], seed=len(k)) for k, v in data.splits.items()}
    data.stats["samples"] = {k: len(v) for k, v in data.splits.items()}


def _model_name(cfg: CTRRecipe) -> str:
    if cfg.model.backbone in ("bahe", "llm_ctr"):
        return f"{cfg.model.backbone.upper()} ({cfg.model.head.upper()} head)"
    return cfg.model.backbone.upper() + (" + LARR scene" if cfg.model.scene == "larr" else "")


def run_text_variants(cfg: CTRRecipe, data, items, profiles, run: RunRecorder, out: Path, log) -> tuple[list[dict], dict]:
    """The text / knowledge variants: MiniLM feature tables through the KAR and the MLP adaptor."""
    dense, feature_report = build_dense_inputs(cfg, data, items, profiles, run, out)
    results = []
    for variant, inputs in cfg.variants.items():
        absent = [i for i in inputs if i not in dense]
        if absent:
            feature_report.setdefault("skipped_variants", {})[variant] = {i: feature_report["skipped_inputs"].get(i, "not built") for i in absent}
            print(f"[{cfg.name}] variant {variant} skipped: {feature_report['skipped_variants'][variant]}")
            continue
        for adaptor in ([None] if not inputs else cfg.adaptors):
            for seed in cfg.seeds:
                result = train_ctr(data.splits, len(data.item_ids), [dense[i] for i in inputs], cfg.model, cfg.train, adaptor, seed)
                result["variant"] = variant
                results.append(result)
                log(result)
    return results, feature_report


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
