"""LARR (Meituan, RecSys 2024): real-time scene features as LLM text vectors, aggregated and aligned to the ID space.

- Scene features: each a short text (the user's profile, the event's time context, the target item, each of
  the user's last few behaviours), encoded *separately* by a frozen encoder — a causal LM mean-pooled over
  its last layer (SmolLM2 by default) or a sentence-transformers export of `recforge align` (the aligned
  LLM of LARR's stage 2) — and cached in a text-hash table with a contract, like BAHE's.
- Aggregation encoder: a small bidirectional transformer over the feature vectors (projected, plus a slot
  embedding naming each feature) with a learnable `[AGG]` token in front; the `[AGG]` output goes through
  an MLP to the size of the CTR model's collaborative representation [item id embedding; pooled history].
- Alignment: InfoNCE between the aggregated scene vector and that collaborative vector, the batch's other
  samples as negatives. `schedule: joint` adds it to the BCE loss every step; `schedule: before` first
  aligns the aggregator to a trained IDs-only model's vectors for `align_epochs`, then trains on BCE.
- The aggregated vector is one more dense input of the DIN / DCN head (through the MLP adaptor).

Variants: `ids_only`, `scene_concat` (the per-feature vectors concatenated, no aggregation), `larr`,
`larr_no_align` (the same aggregator, alignment weight 0).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recforge.align.ctr.config import CTRRecipe, LARRConfig, ModelConfig, TrainConfig
from recforge.align.ctr.data import CTRData, SampleArrays, render_template
from recforge.align.ctr.features import cached_text_vectors, text_key
from recforge.align.ctr.models import CTRModel, mlp
from recforge.align.ctr.train import fit, metrics, train_ctr_model

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


# ---------------------------------------------------------------------------------------------- model


def info_nce(scene: torch.Tensor, collab: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the batch: sample i's scene vector should pick its own collaborative vector (cosine / tau)."""
    logits = F.normalize(scene, dim=-1) @ F.normalize(collab, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(scene), device=scene.device))


class SceneAggregator(nn.Module):
    """[AGG] + projected feature vectors -> bidirectional TransformerEncoder -> MLP(out_dim) on the [AGG] output."""

    def __init__(self, in_dim: int, n_slots: int, out_dim: int, cfg: LARRConfig):
        super().__init__()
        self.proj = nn.Linear(in_dim, cfg.d_model)
        self.slot = nn.Embedding(n_slots, cfg.d_model)  # which feature a vector is: the encoder has no positions
        self.agg = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = mlp([cfg.d_model, cfg.d_model, out_dim], final_activation=False)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """features (B, F, in_dim), present (B, F) bool -> (B, out_dim)."""
        x = self.proj(features) + self.slot.weight.unsqueeze(0)
        x = torch.cat([self.agg.expand(len(x), -1, -1), x], dim=1)
        padding = torch.cat([torch.zeros(len(x), 1, dtype=torch.bool), ~present], dim=1)  # [AGG] is never masked
        return self.out(self.encoder(x, src_key_padding_mask=padding)[:, 0])


class SceneCTRModel(nn.Module):
    """The CTR head over IDs plus one scene input: the concatenated feature vectors, or LARR's aggregate."""

    def __init__(self, model_cfg: ModelConfig, n_items: int, table: np.ndarray, n_slots: int, mode: str):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(table), persistent=False)  # frozen text vectors, row 0 = absent
        self.mode = mode
        dim = table.shape[1]
        # LLM states have a few outlier dimensions tens of times the rest: normalise each feature vector first
        self.norm = nn.LayerNorm(dim)
        collab_dim = 2 * model_cfg.embed_dim  # CTRModel's [target item; pooled history]
        self.aggregator = SceneAggregator(dim, n_slots, collab_dim, model_cfg.larr) if mode == "larr" else None
        self.ctr = CTRModel(model_cfg, n_items, [collab_dim if mode == "larr" else n_slots * dim], "mlp")

    def scene_vector(self, rows: torch.Tensor) -> torch.Tensor:
        present = rows > 0
        features = self.norm(self.table[rows]) * present.unsqueeze(-1)  # an absent feature stays a zero vector
        if self.aggregator is None:
            return features.flatten(1)
        return self.aggregator(features, present)

    def forward(self, target, history, rating, rows):
        """-> (logits, scene vector, collaborative vector)."""
        scene = self.scene_vector(rows)
        logits, collab = self.ctr.logits_and_collaborative(target, history, rating, [scene])
        return logits, scene, collab


# ------------------------------------------------------------------------------------------ scene texts


@dataclass
class SceneTexts:
    """Each sample's feature texts as rows of one vector table (0 = feature absent)."""

    slots: list[str]
    texts: list[str]  # row r (1-based) of the table is texts[r - 1]
    rows: dict[str, np.ndarray]  # split -> (N, len(slots)) int64


def _time_fields(timestamp: float) -> dict[str, Any]:
    t = dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)
    return {"hour": t.hour, "weekday": WEEKDAYS[t.weekday()]}


def _profile_fields(profile: dict[str, Any], cfg: LARRConfig) -> dict[str, Any]:
    zip_code = str(profile.get("zip_code") or "")
    return {**profile, "zip_prefix": zip_code[: cfg.zip_prefix_chars]}


class _Rows:
    """Text -> table row, deduplicated by normalised text."""

    def __init__(self):
        self.by_key: dict[str, int] = {}
        self.texts: list[str] = []

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        key = text_key(text)
        if key not in self.by_key:
            self.texts.append(text)
            self.by_key[key] = len(self.texts)
        return self.by_key[key]


def scene_texts(data: CTRData, items: dict, profiles: dict | None, cfg: LARRConfig) -> SceneTexts:
    rows = _Rows()
    item_row = np.array([0] + [rows(render_template(cfg.item_template, items[i].fields) if i in items else f"item {i}")
                               for i in data.item_ids], dtype=np.int64)
    slots = []
    use_profile = bool(cfg.profile_template and profiles)
    use_time = cfg.time_template is not None
    slots += ["profile"] if use_profile else []
    slots += ["time"] if use_time else []
    slots += ["target"] + [f"recent_{j + 1}" for j in range(cfg.recent_items)]
    by_split = {}
    for name, split in data.splits.items():
        cols = []
        if use_profile:
            cols.append([rows(render_template(cfg.profile_template, _profile_fields(profiles.get(u, {}), cfg)))
                         for u in split.user_ids])
        if use_time:
            ts = split.timestamp if split.timestamp is not None else np.full(len(split), np.nan)
            cols.append([0 if np.isnan(t) else rows(render_template(cfg.time_template, _time_fields(t))) for t in ts])
        columns = [np.asarray(c, dtype=np.int64) for c in cols] + [item_row[split.target]]
        recent = split.history[:, ::-1][:, : cfg.recent_items]  # most recent first
        columns += [item_row[recent[:, j]] for j in range(recent.shape[1])]
        by_split[name] = np.stack(columns, axis=1) if len(split) else np.zeros((0, len(slots)), np.int64)
    return SceneTexts(slots, rows.texts, by_split)


class SceneEncoder:
    """The frozen encoder of the scene texts: a sentence-transformers folder, or a causal LM (mean of its last layer)."""

    def __init__(self, name: str, cfg: LARRConfig):
        from recforge.align.ctr.bahe import load_backbone
        from recforge.models import resolve_model

        self.path = Path(resolve_model(name)).expanduser()
        self.cfg = cfg
        if (self.path / "modules.json").is_file():
            from sentence_transformers import SentenceTransformer

            from recforge.models import check_model_folder

            check_model_folder(self.path, "scene encoder")  # load_backbone checks the plain-transformers case

            self.st = SentenceTransformer(str(self.path), device="cpu")
            self.st.max_seq_length = cfg.max_tokens
            self.dim, self.pooling, self.layers = self.st.get_embedding_dimension(), "sentence-transformers", None
        else:
            self.st = None
            self.tokenizer, self.model = load_backbone(self.path)
            self.dim, self.pooling, self.layers = self.model.config.hidden_size, "mean", self.model.config.num_hidden_layers

    def contract(self) -> dict[str, Any]:
        from recforge.fingerprint import folder_digest

        return {"cache_kind": "larr_scene", "model_fingerprint": folder_digest(self.path), "pooling": self.pooling,
                "num_layers": self.layers, "max_tokens": self.cfg.max_tokens}

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.st is not None:
            return self.st.encode(texts, batch_size=self.cfg.batch_size, convert_to_numpy=True, normalize_embeddings=False,
                                  show_progress_bar=len(texts) > 2000)
        from recforge.align.ctr.bahe import encode_texts

        return encode_texts(self.model, self.tokenizer, texts, self.cfg.max_tokens, self.cfg.batch_size, "LARR scene texts")


def scene_table(scene: SceneTexts, cfg: LARRConfig, table_dir: Path) -> tuple[np.ndarray, dict]:
    """(len(texts) + 1, H) frozen vectors in the order of `scene.texts`, from the cached table."""
    encoder = SceneEncoder(cfg.encoder, cfg)
    index, vectors, info = cached_text_vectors(table_dir, name="larr_scene", entity="scene_text", texts=scene.texts,
                                               contract=encoder.contract(), model=str(encoder.path), dimension=encoder.dim,
                                               encode=encoder.encode, config_key="model.larr.cache_dir")
    rows = [index[text_key(t)] for t in scene.texts]
    info.update({"encoder": str(encoder.path), "pooling": encoder.pooling, "slots": scene.slots})
    return np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors[rows]]), info


# ------------------------------------------------------------------------------------------- training


def _tensors(split: SampleArrays, rows: np.ndarray):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (split.target, split.history, split.history_rating, rows))


@torch.no_grad()
def predict_scene(model: SceneCTRModel, split: SampleArrays, rows: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    target, history, rating, r = _tensors(split, rows)
    out = [torch.sigmoid(model(target[s : s + batch_size], history[s : s + batch_size], rating[s : s + batch_size],
                               r[s : s + batch_size])[0]) for s in range(0, len(split), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def align_before(model: SceneCTRModel, teacher: CTRModel, split: SampleArrays, rows: np.ndarray, cfg: LARRConfig,
                 train_cfg: TrainConfig, rng: np.random.Generator) -> list[float]:
    """schedule=before: the aggregator learns to point at a trained IDs-only model's collaborative vectors."""
    teacher.eval()
    optim = torch.optim.AdamW(model.aggregator.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    target, history, rating, r = _tensors(split, rows)
    losses = []
    for _ in range(cfg.align_epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(split)))
        total = 0.0
        for start in range(0, len(split), train_cfg.per_device_train_batch_size):
            idx = order[start : start + train_cfg.per_device_train_batch_size]
            with torch.no_grad():
                collab = teacher.logits_and_collaborative(target[idx], history[idx], rating[idx], [])[1]
            loss = info_nce(model.scene_vector(r[idx]), collab, cfg.temperature)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item() * len(idx)
        losses.append(total / len(split))
    return losses


def train_scene_variant(variant: str, splits: dict[str, SampleArrays], scene: SceneTexts, table: np.ndarray, n_items: int,
                        model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int, teacher: CTRModel | None) -> dict:
    cfg = model_cfg.larr
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mode = "concat" if variant == "scene_concat" else "larr"
    model = SceneCTRModel(model_cfg, n_items, table, len(scene.slots), mode)
    weight = cfg.align_weight if variant == "larr" else 0.0
    pre = []
    if weight and cfg.schedule == "before":
        pre = align_before(model, teacher, splits["train"], scene.rows["train"], cfg, train_cfg, rng)
        weight = 0.0  # aligned first; the CTR loss alone from here
    optim = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    target, history, rating, rows = _tensors(splits["train"], scene.rows["train"])
    label = torch.from_numpy(splits["train"].label)
    parts = {"bce": 0.0, "align": 0.0}

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits, scene_vec, collab = model(target[idx], history[idx], rating[idx], rows[idx])
        loss = F.binary_cross_entropy_with_logits(logits, label[idx])
        parts["bce"] += loss.item() * len(idx)
        if weight:
            align = info_nce(scene_vec, collab.detach() if cfg.detach_collaborative else collab, cfg.temperature)
            parts["align"] += align.item() * len(idx)
            loss = loss + weight * align
        return loss

    fitted = fit(model, optim, len(splits["train"]), batch_loss, lambda: predict_scene(model, splits["valid"], scene.rows["valid"]),
                 splits["valid"].label, train_cfg, rng)
    test = metrics(splits["test"].label, predict_scene(model, splits["test"], scene.rows["test"]))
    seen = max(1, len(splits["train"]) * len(fitted.epochs))
    return {"seed": seed, "adaptor": "mlp", "variant": variant, "dense_inputs": scene.slots,
            "align_weight": cfg.align_weight if variant == "larr" else 0.0, "schedule": cfg.schedule if variant == "larr" else None,
            "pre_align_losses": pre, "mean_train_losses": {k: v / seen for k, v in parts.items()}, **fitted.result(test)}


def run_larr_variants(cfg: CTRRecipe, data: CTRData, items: dict, profiles: dict | None, out: Path, log) -> tuple[list[dict], dict]:
    """`model.scene: larr`: the four variants over the recipe's seeds, sharing one cached scene table."""
    larr = cfg.model.larr
    scene = scene_texts(data, items, profiles, larr)
    table_dir = Path(larr.cache_dir) if larr.cache_dir else out / "features" / "larr_scene"
    table, info = scene_table(scene, larr, table_dir)
    n_items = len(data.item_ids)
    results = []
    need_ids = "ids_only" in larr.variants or (larr.schedule == "before" and "larr" in larr.variants)
    for seed in cfg.seeds:
        teacher, base = train_ctr_model(data.splits, n_items, [], cfg.model, cfg.train, None, seed) if need_ids else (None, None)
        if "ids_only" in larr.variants:
            results.append({**base, "variant": "ids_only"})
            log(results[-1])
        for variant in [v for v in larr.variants if v != "ids_only"]:
            results.append(train_scene_variant(variant, data.splits, scene, table, n_items, cfg.model, cfg.train, seed, teacher))
            log(results[-1])
    return results, {"scene_table": info}
