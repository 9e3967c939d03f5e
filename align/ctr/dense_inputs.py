"""The CTR bridge's dense inputs: item / user text, generated knowledge and judgements -> aligned feature matrices.

Each text feature is encoded once by a `TextEncoder` (MiniLM, or the aligned LLM embedder) into a versioned feature
table (`features.py`: reused when the texts and the model are the same), reloaded through its contract and aligned
to the samples' item / user ids; row 0 of every matrix is the padding / unknown row. An input that cannot be built
(no knowledge table yet, no judgement run, no aligned embedder) is skipped with its reason, and so are the variants
that need it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recforge.align.ctr.config import CTRRecipe, EmbeddingConfig
from recforge.align.ctr.data import item_texts, user_history_texts
from recforge.align.ctr.features import FeatureExpectation, align_to_ids, load_feature_table, write_feature_table
from recforge.align.ctr.train import DenseInput
from recforge.config import RecforgeError
from recforge.features_table import features_table
from recforge.io import resolve_path
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
                                   extra={"text_sha256": texts_hash(texts), "max_seq_length": self.model.max_seq_length,
                                          "encode_wall_seconds": round(sw.wall, 2), "encode_cpu_seconds": round(sw.cpu, 2)})

    def cached_table(self, out_dir: Path, texts: dict[str, str]) -> dict | None:
        from recforge.align.ctr.features import CONTRACT_FILE, model_revision

        path = Path(out_dir) / CONTRACT_FILE
        if not path.is_file():
            return None
        contract = json.loads(path.read_text(encoding="utf-8"))
        same = (contract.get("text_sha256") == texts_hash(texts)
                and contract.get("model", {}).get("revision") == model_revision(self.model_path)
                and contract.get("normalized") == self.cfg.normalize
                and contract.get("max_seq_length") == self.model.max_seq_length)
        return contract if same else None

    def expectation(self, entity: str) -> FeatureExpectation:
        return FeatureExpectation(dimension=self.model.get_embedding_dimension(), model=self.model_path,
                                  normalized=self.cfg.normalize, entity=entity)


def texts_hash(texts: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(texts):
        h.update(f"{key}\t{texts[key]}\n".encode())
    return h.hexdigest()


def knowledge_texts(path: str) -> dict[str, dict[str, str]]:
    """generate's features table (a file or a folder, `recforge.features_table`) -> {"item": {id: text},
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
            source_hashes["knowledge"] = texts_hash({**know["item"], **{f"u:{k}": v for k, v in know["user"].items()}})
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
