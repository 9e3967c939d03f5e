"""`recforge eval ctr RECIPE`: does the knowledge recforge produces show up as CTR AUC?

One run: behaviour log -> guarded, user-split CTR samples (optionally a new-item split: held-out items are never a
training / validation target) -> dense features (item text, the user's prompt-only history text, generated
knowledge encoded by the text encoder, a generated choice judgement as a small vector) -> every variant through the
KAR or the MLP adaptor, each tuned with the same fixed budget on the validation users, over several seeds ->
`report.json`, `report.md` and `auc.png`, plus the verdict (`verdict.{json,md,png}`, align/ctr/verdict.py): the
logistic-regression and popularity floors, each variant's warm- and new-target AUC, its paired delta to the tuned
IDs-only model with a bootstrap interval over test users, the chosen settings and the cost of every variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from recforge.align.ctr.config import CTRRecipe, EmbeddingConfig, ExportFeaturesRecipe
from recforge.align.ctr.data import build_ctr_data, item_texts, render_template, user_history_texts
from recforge.align.ctr.train import DenseInput, train_ctr_model
from recforge.align.ctr.features import FeatureExpectation, align_to_ids, load_feature_table, write_feature_table
from recforge.config import RecforgeError
from recforge.readers import RejectLog, features_table, read_interactions, read_items
from recforge.io import atomic_write_json, atomic_write_text, resolve_path, sha256_file
from recforge.manifest import RunRecorder


def embedding_model_path(cfg: EmbeddingConfig) -> str:
    """The encoder folder, after the check every model load goes through (`recforge.models.check_model_folder`)."""
    from recforge.models import check_model_folder, resolve_model

    path = resolve_model(cfg.model)
    check_model_folder(path, "embedding.model")
    return path


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
        from recforge.align.ctr.verdict import Stopwatch

        ids = sorted(texts)
        with Stopwatch() as sw:
            vectors = self.encode([texts[i] for i in ids])
        return write_feature_table(out_dir, name=name, entity=entity, ids=ids, vectors=vectors, model=self.model_path,
                                   normalized=self.cfg.normalize, source_hashes=sources,
                                   extra={"text_sha256": _texts_hash(texts), "max_seq_length": self.model.max_seq_length,
                                          "encode_wall_seconds": round(sw.wall, 2), "encode_cpu_seconds": round(sw.cpu, 2)})

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
    """generate's features table (a file or a folder, `recforge.readers.features_table`) -> {"item": {id: text},
    "user": {id: text}} (knowledge, summary, tags joined)."""
    table = features_table(path, "inputs.knowledge", required=("entity_type", "entity_id"))
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
    if "item_llm_embedding" in needed:  # the same item text, encoded by the aligned LLM embedder (`recforge align`'s export)
        if cfg.llm_embedding is not None and resolve_path(cfg.llm_embedding.model).exists():
            texts["item_llm_embedding"] = ("item", item_texts(items, cfg.text.item_template))
        else:
            skipped["item_llm_embedding"] = "no aligned LLM embedder (llm_embedding.model unset or absent): run `recforge align` first"
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
    dense, coverage, encode_cost = {}, {}, {}
    judgement_info = None
    if "item_judgement" in needed:
        path = cfg.inputs.judgement
        if path and resolve_path(path).exists():
            from recforge.align.ctr.judgement import judgement_table

            try:
                ids, vectors, judgement_info = judgement_table(path)
            except RecforgeError as err:  # a run not finished yet, or no answer among the choices: the variant is skipped
                skipped["item_judgement"] = str(err)
            else:
                matrix, cov = align_to_ids("item_judgement", ids, vectors, data.item_ids)
                coverage["item_judgement"] = cov.to_dict()
                dense["item_judgement"] = DenseInput("item_judgement", "item", np.vstack([np.zeros((1, matrix.shape[1]), np.float32), matrix]))
                encode_cost["item_judgement"] = {"encode_wall_seconds": 0.0, "encode_cpu_seconds": 0.0}
        else:
            skipped["item_judgement"] = "no judgement run (inputs.judgement unset or absent): run `recforge generate` first"
    encoders: dict[str, TextEncoder] = {}  # loaded once each, only where a variant needs them
    for name, (entity, by_id) in texts.items():
        if not by_id:
            skipped[name] = f"the {name} table is empty"
            continue
        which = "llm_embedding" if name == "item_llm_embedding" else "embedding"
        if which not in encoders:
            encoders[which] = TextEncoder(getattr(cfg, which))
        encoder = encoders[which]
        table_dir = out / "features" / name
        written = encoder.write_table(table_dir, name, entity, by_id, source_hashes)
        encode_cost[name] = {k: written.get(k) for k in ("encode_wall_seconds", "encode_cpu_seconds")}
        ids, vectors, contract = load_feature_table(table_dir, encoder.expectation(entity))
        needed_ids = data.item_ids if entity == "item" else user_ids
        matrix, cov = align_to_ids(name, ids, vectors, needed_ids)
        coverage[name] = {**cov.to_dict(), "version": contract["version"]}
        padded = np.vstack([np.zeros((1, matrix.shape[1]), np.float32), matrix])  # row 0 = padding / unknown
        rows = {u: i + 1 for i, u in enumerate(user_ids)} if entity == "user" else None
        dense[name] = DenseInput(name, entity, padded, rows)
    report = {"coverage": coverage, "skipped_inputs": skipped, "encode_cost": encode_cost}
    if judgement_info is not None:
        report["judgement"] = judgement_info
    return dense, report


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
    title = f"{cfg.name}: {_model_name(cfg)} test AUC by variant"
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


def verdict_text(verdict: dict) -> str:
    from recforge.align.ctr.verdict import verdict_markdown

    return verdict_markdown(verdict)


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


def _model_name(cfg: CTRRecipe) -> str:
    if cfg.model.backbone in ("bahe", "llm_ctr"):
        return f"{cfg.model.backbone.upper()} ({cfg.model.head.upper()} head)"
    return cfg.model.backbone.upper() + (" + LARR scene" if cfg.model.scene == "larr" else "")


def run_text_variants(cfg: CTRRecipe, data, items, profiles, run: RunRecorder, out: Path, log) -> tuple[list[dict], dict]:
    """The text / knowledge / judgement variants: dense inputs through the KAR (or MLP) adaptor, each variant tuned
    with the same budget (`tuning`), then trained on every seed."""
    dense, feature_report = build_dense_inputs(cfg, data, items, profiles, run, out)
    results, tuning = train_variants(cfg, data, dense, feature_report, log, out / "trainings")
    feature_report["tuning"] = tuning
    return results, feature_report


def train_variants(cfg: CTRRecipe, data, dense: dict, feature_report: dict, log, cache_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Every (variant, adaptor): `tuning.budget` settings (the same list for all) on the validation users, the best
    trained on every seed. Results carry `test_probs` (popped before the report is written) and their cost.

    `cache_dir`: finished trainings are kept there, keyed by the samples, the dense inputs' content, the setting and
    the seed, so a rerun (say, once generated knowledge exists) trains only what is new."""
    from recforge.align.ctr.tuning import candidates, tune_and_train
    from recforge.align.ctr.verdict import Stopwatch

    data_key = _data_digest(data)

    def train_fn(model_cfg, train_cfg, seed, inputs, adaptor):
        key = _training_key(data_key, [dense[i] for i in inputs], model_cfg, train_cfg, adaptor, seed)
        cached = _cached_training(cache_dir, key)
        if cached is not None:  # the same data, inputs, setting and seed: the same training (cost as first measured)
            return cached
        with Stopwatch() as sw:
            _, result = train_ctr_model(data.splits, len(data.item_ids), [dense[i] for i in inputs], model_cfg, train_cfg,
                                        adaptor, seed, keep_probs=True)
        result.update(cpu_seconds=round(sw.cpu, 2), wall_seconds=round(sw.wall, 2))
        _store_training(cache_dir, key, result)
        return result

    results = []
    tuning = {"budget": cfg.tuning.budget, "seed": cfg.tuning.seed, "space": cfg.tuning.space,
              "candidates": candidates(cfg.tuning, cfg.model, cfg.train), "variants": {}}
    for variant, inputs in cfg.variants.items():
        absent = [i for i in inputs if i not in dense]
        if absent:
            feature_report.setdefault("skipped_variants", {})[variant] = {i: feature_report["skipped_inputs"].get(i, "not built") for i in absent}
            print(f"[{cfg.name}] variant {variant} skipped: {feature_report['skipped_variants'][variant]}")
            continue
        for adaptor in ([None] if not inputs else cfg.adaptors):
            done = tune_and_train(lambda m, t, seed: train_fn(m, t, seed, inputs, adaptor), cfg.tuning, cfg.model,
                                  cfg.train, cfg.seeds)
            key = variant if adaptor is None or len(cfg.adaptors) == 1 else f"{variant}/{adaptor}"
            tuning["variants"][key] = {"trials": done["trials"], "chosen": done["chosen"]}
            for result in done["runs"]:
                result["variant"] = variant
                results.append(result)
                log(result)
            extra_seeds = [r for r in done["runs"] if not r.get("reused_from_tuning")]
            tuning["variants"][key]["train_cost"] = {
                "wall_seconds": round(sum(t["train_seconds"] for t in done["trials"]) + sum(r["train_seconds"] for r in extra_seeds), 2),
                "cpu_seconds": round(sum(t["cpu_seconds"] or 0 for t in done["trials"]) + sum(r["cpu_seconds"] for r in extra_seeds), 2),
                "trainings": len(done["trials"]) + len(extra_seeds)}
    return results, tuning


def _data_digest(data) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("train", "valid", "test"):
        sp = data.splits[name]
        for arr in (sp.target, sp.history, sp.history_rating, sp.label):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\0".join(map(str, sp.user_ids)).encode())
    h.update(np.ascontiguousarray(data.held_out_items).tobytes())
    return h.hexdigest()


def _training_key(data_key: str, dense: list, model_cfg, train_cfg, adaptor, seed: int) -> str:
    import hashlib

    h = hashlib.sha256(data_key.encode())
    for d in dense:
        h.update(d.name.encode() + np.ascontiguousarray(d.matrix, dtype=np.float32).tobytes())
    h.update(json.dumps([model_cfg.model_dump(mode="json"), train_cfg.model_dump(mode="json"), adaptor, seed],
                        sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cached_training(cache_dir: Path | None, key: str) -> dict | None:
    if cache_dir is None or not (cache_dir / f"{key}.json").is_file() or not (cache_dir / f"{key}.npy").is_file():
        return None
    result = json.loads((cache_dir / f"{key}.json").read_text(encoding="utf-8"))
    result["test_probs"] = np.load(cache_dir / f"{key}.npy")
    result["from_cache"] = True
    return result


def _store_training(cache_dir: Path | None, key: str, result: dict) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{key}.tmp.npy"
    np.save(tmp, result["test_probs"])
    tmp.replace(cache_dir / f"{key}.npy")
    atomic_write_json(cache_dir / f"{key}.json", {k: v for k, v in result.items() if k != "test_probs"})


LLM_INPUTS = {"item_knowledge", "user_knowledge", "item_judgement", "item_llm_embedding"}


def _cached_floor(cache_dir: Path | None, data_key: str, c_grid: list[float], fit) -> dict:
    """The logistic floor of these exact samples and C grid, fitted once (kept beside the cached trainings)."""
    import hashlib

    key = "floor-" + hashlib.sha256(json.dumps([data_key, c_grid]).encode()).hexdigest()[:32]
    cached = _cached_training(cache_dir, key)
    if cached is not None:
        return cached
    floor = fit()
    _store_training(cache_dir, key, floor)
    return floor


def build_verdict(cfg: CTRRecipe, data, results: list[dict], probs: dict, feature_report: dict, machine: dict,
                  cache_dir: Path | None = None) -> dict:
    """Floors + every variant's warm / new test AUC, paired Δ vs the tuned IDs-only model with bootstrap intervals,
    the chosen settings and the cost of each variant (generation, encoding, training)."""
    from recforge.align.ctr.verdict import BASE, generation_cost, group_metrics, logistic_floor, popularity_floor

    test = data.splits["test"]
    groups = data.test_groups() if cfg.new_items.enabled else {"warm": np.arange(len(test))}
    tuning = feature_report.get("tuning", {})
    entries: dict[str, dict] = {}
    rows_meta: list[dict] = []
    floors = []
    if cfg.floors.logistic:
        floors.append(_cached_floor(cache_dir, _data_digest(data), cfg.floors.logistic_c,
                                    lambda: logistic_floor(data.splits, len(data.item_ids), cfg.floors.logistic_c)))
    if cfg.floors.popularity:
        floors.append(popularity_floor(data.splits, len(data.item_ids)))
    for f in floors:
        entries[f["name"]] = {"scores": [f["test_probs"]]}
        c = f["cost"]
        rows_meta.append({"variant": f["name"], "inputs": [], "kind": "floor", "chosen": f["chosen"],
                          "cost": {"train_wall_seconds": c["train_wall_seconds"], "train_cpu_seconds": c["train_cpu_seconds"]}})

    gen_sources = dict(cfg.costs)
    if cfg.inputs.judgement and "item_judgement" not in gen_sources:
        gen_sources["item_judgement"] = cfg.inputs.judgement
    if cfg.inputs.knowledge and "item_knowledge" not in gen_sources:
        parent = resolve_path(cfg.inputs.knowledge)
        parent = parent.parent if parent.name == "features" or parent.suffix == ".parquet" else parent
        gen_sources["item_knowledge"] = str(parent)
    if cfg.llm_embedding is not None and "item_llm_embedding" not in gen_sources:  # the aligned embedder's training run
        folder = resolve_path(cfg.llm_embedding.model)
        gen_sources["item_llm_embedding"] = str(folder.parent if folder.name == "model" else folder)
    gen_cost = {name: generation_cost(path) for name, path in gen_sources.items()}
    encode_cost = feature_report.get("encode_cost", {})
    adaptors = sorted({r["adaptor"] for r in results if r["adaptor"]})
    for (variant, adaptor) in dict.fromkeys((r["variant"], r["adaptor"]) for r in results):
        key = variant if adaptor is None or len(cfg.adaptors) == 1 else f"{variant}/{adaptor}"
        seeds = sorted(s for (v, a, s) in probs if v == variant and a == adaptor)
        entries[key] = {"scores": [probs[(variant, adaptor, s)] for s in seeds]}
        inputs = list(cfg.variants.get(variant, []))
        train = tuning.get("variants", {}).get(key, {}).get("train_cost", {})
        cost = {"train_wall_seconds": train.get("wall_seconds"), "train_cpu_seconds": train.get("cpu_seconds"),
                "trainings": train.get("trainings"),
                "encode": {i: encode_cost.get(i) for i in inputs if i in encode_cost},
                "generation": {i: gen_cost[i] for i in inputs if i in gen_cost}}
        rows_meta.append({"variant": key, "inputs": inputs, "kind": "llm" if LLM_INPUTS & set(inputs) else "model",
                          "adaptor": adaptor, "chosen": tuning.get("variants", {}).get(key, {}).get("chosen"), "cost": cost})
    if BASE not in entries:
        return {"name": cfg.name, "status": "no ids_only variant: no deltas", "groups": {}, "rows": []}
    metrics = group_metrics(entries, test.label, test.user_ids, groups, cfg.bootstrap.resamples, cfg.bootstrap.seed,
                            cfg.bootstrap.level)
    rows = []
    for meta in rows_meta:
        c = meta["cost"]
        wall = (c.get("train_wall_seconds") or 0) + sum((e or {}).get("encode_wall_seconds") or 0 for e in c.get("encode", {}).values()) \
            + sum(g.get("wall_seconds") or 0 for g in c.get("generation", {}).values())
        cpu_h = ((c.get("train_cpu_seconds") or 0) + sum((e or {}).get("encode_cpu_seconds") or 0 for e in c.get("encode", {}).values())) / 3600 \
            + sum(g.get("cpu_hours") or 0 for g in c.get("generation", {}).values())
        c.update(total_wall_seconds=round(wall, 1), total_cpu_hours=round(cpu_h, 4))
        rows.append({**meta, "seeds": len(entries[meta["variant"]]["scores"]), "groups": metrics[meta["variant"]]})
    excluding = [f"{r['variant']} ({g} {r['groups'][g]['delta']:+.4f})" for r in rows for g in groups
                 if r["groups"].get(g, {}).get("excludes_zero")]
    verdict = {"name": cfg.name, "model": _model_name(cfg), "level": cfg.bootstrap.level, "resamples": cfg.bootstrap.resamples,
               "bootstrap_seed": cfg.bootstrap.seed, "groups": {g: int(len(i)) for g, i in groups.items()},
               "test_users": int(len(np.unique(test.user_ids))), "test_samples": {g: int(len(i)) for g, i in groups.items()},
               "new_items": data.stats.get("new_items"), "seeds": cfg.seeds, "adaptors": adaptors, "rows": rows,
               "excluding_zero": excluding, "floors_chosen": [{"name": f["name"], "chosen": f["chosen"],
                                                                 "trials": f.get("trials")} for f in floors],
               "tuning": {"budget": tuning.get("budget"), "seed": tuning.get("seed"), "candidates": tuning.get("candidates"),
                          "trials_per_variant": {k: len(v["trials"]) for k, v in tuning.get("variants", {}).items()},
                          "chosen": {k: (v["chosen"], max(t["valid_auc"] for t in v["trials"]))
                                     for k, v in tuning.get("variants", {}).items()}} if tuning else None,
               "machine": machine}
    verdict["skipped_variants"] = feature_report.get("skipped_variants", {})
    verdict["goals"] = verdict_goals(verdict, entries, test, groups, cfg)
    return verdict


def verdict_goals(verdict: dict, entries: dict, test, groups: dict, cfg: CTRRecipe) -> list[dict]:
    """Issue 24's goals, computed (never asserted): tuned DIN >= LR floor on warm targets; on new targets the best
    LLM-derived variant >= IDs-only + 0.02 with an interval above 0, and above the MiniLM text variant."""
    from recforge.align.ctr.verdict import paired_delta, user_resample_weights

    by = {r["variant"]: r for r in verdict["rows"]}
    goals = []
    lr, base = by.get("logistic_regression"), by.get("ids_only")
    if lr and base and base["groups"]["warm"].get("auc_mean") is not None:
        b, f = base["groups"]["warm"]["auc_mean"], lr["groups"]["warm"]["auc_mean"]
        d = lr["groups"]["warm"]
        goals.append({"goal": "tuned IDs-only DIN >= logistic-regression floor (warm targets)", "met": bool(b >= f),
                      "detail": f"DIN {b:.4f} vs LR {f:.4f}; LR − DIN {d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"})
    if "new" in groups and len(groups["new"]):
        llm = [r for r in verdict["rows"] if r["kind"] == "llm" and r["groups"]["new"].get("delta") is not None]
        if not llm:
            skipped = verdict.get("skipped_variants") or {}
            why = "; ".join(f"{v}: {', '.join(f'{i} ({r})' for i, r in reasons.items())}" for v, reasons in skipped.items())
            for goal in ("best LLM-derived variant on new items >= IDs-only + 0.02, interval above 0",
                         "best LLM-derived variant beats the MiniLM title/genre text variant on new items"):
                goals.append({"goal": goal, "met": False, "detail": "not measured: no LLM-derived variant ran"
                              + (f" ({why})" if why else "")})
        if llm:
            best = max(llm, key=lambda r: r["groups"]["new"]["delta"])
            n = best["groups"]["new"]
            goals.append({"goal": "best LLM-derived variant on new items >= IDs-only + 0.02, interval above 0",
                          "met": bool(n["delta"] >= 0.02 and n["ci_low"] > 0),
                          "detail": f"{best['variant']}: {n['delta']:+.4f} [{n['ci_low']:+.4f}, {n['ci_high']:+.4f}]"})
            text = by.get("item_text") or next((r for r in verdict["rows"] if r["variant"].startswith("item_text")), None)
            if text and text["groups"]["new"].get("auc_mean") is not None:
                idx = groups["new"]
                w = user_resample_weights(test.user_ids, cfg.bootstrap.resamples, cfg.bootstrap.seed)[:, idx]
                d = paired_delta([s[idx] for s in entries[best["variant"]]["scores"]],
                                 [s[idx] for s in entries[text["variant"]]["scores"]], test.label[idx], w, cfg.bootstrap.level)
                # a lift whose interval includes 0 is not a lift
                goals.append({"goal": "best LLM-derived variant beats the MiniLM title/genre text variant on new items",
                              "met": bool(d["delta"] > 0 and d["ci_low"] > 0),
                              "detail": f"{best['variant']} − {text['variant']}: {d['delta']:+.4f} [{d['ci_low']:+.4f}, "
                                        f"{d['ci_high']:+.4f}]{' (interval excludes 0)' if d['excludes_zero'] else ' (interval includes 0)'}"})
    return goals


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
