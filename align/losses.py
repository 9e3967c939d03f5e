"""Contrastive losses for align.

sentence-transformers' `MultipleNegativesRankingLoss` / `CachedMultipleNegativesRankingLoss` (GradCache) /
`MatryoshkaLoss` are used whenever they can express the recipe. `InfoNCELoss` below is custom only
because those losses see texts, never ids: they cannot mask in-batch "negatives" that are really
positives (the same item under another query, or another known positive of the anchor), and their
temperature is a fixed float. It reuses ST's column embedding and cross-device gathering.

Ids reach the loss through the `label` column: each training row's label is its row index, and the loss
looks the row's anchor id, item ids and known positives up in tables built once from the pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from recforge.config import RecforgeError

from .align_config import LossConfig


class PairIdTable:
    """Per training row: anchor id, [positive id, negative id], and the set of the anchor's known positives (as ints)."""

    def __init__(self, pairs: list[dict], use_weights: bool = False):
        vocab: dict[str, int] = {}

        def code(x) -> int:
            if x is None:
                return -1
            return vocab.setdefault(str(x), len(vocab))

        self.anchor = [code("anchor:" + str(p["anchor_id"])) for p in pairs]
        self.items = [[code(p["positive_id"]), code(p.get("negative_id"))] for p in pairs]
        self.known = [frozenset([code(p["positive_id"]), *(code(i) for i in p.get("anchor_positive_ids") or [])])
                      for p in pairs]
        self.weight = [float(p.get("weight") or 1.0) if use_weights else 1.0 for p in pairs]


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch (+ hard) negatives, false-negative masking, fixed or learnable temperature, symmetric option."""

    def __init__(self, model, ids: PairIdTable, temperature: float = 0.05, learnable_temperature: bool = False,
                 symmetric: bool = False, mask_false_negatives: bool = True, gather_across_devices: bool = False):
        super().__init__()
        self.model = model
        self.ids = ids
        self.symmetric = symmetric
        self.mask_false_negatives = mask_false_negatives
        self.gather_across_devices = gather_across_devices
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)  # NoteLLM/CLIP style: learn log(1/t)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, sentence_features, labels: Tensor) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def _false_negative_mask(self, rows: list[int], cand_rows: list[int], n_cols: int) -> Tensor:
        """mask[i, c] is True where candidate c (column-major: positives, then negatives) is a known positive
        of anchor i other than its own positive column."""
        n_cand = len(cand_rows)
        cand_items = [self.ids.items[r][col] for col in range(n_cols) for r in cand_rows]
        mask = torch.zeros(len(rows), n_cand * n_cols, dtype=torch.bool)
        for i, r in enumerate(rows):
            known = self.ids.known[r]
            for c, item in enumerate(cand_items):
                if item in known:
                    mask[i, c] = True
        return mask

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        from sentence_transformers.util import all_gather, all_gather_with_grad, cos_sim, get_rank

        queries, docs = embeddings[0], embeddings[1:]
        batch = queries.size(0)
        rows = labels.long()
        offset = 0
        all_queries, all_docs, all_rows = queries, docs, rows
        if self.gather_across_devices:
            all_queries = all_gather_with_grad(queries)
            all_docs = [all_gather_with_grad(d) for d in docs]
            all_rows = all_gather(rows)
            offset = get_rank() * batch
        local_rows, cand_rows = rows.tolist(), all_rows.tolist()
        own = torch.arange(offset, offset + batch, device=queries.device)
        scale = self.scale

        scores = cos_sim(queries, torch.cat(all_docs, dim=0)) * scale
        if self.mask_false_negatives:
            mask = self._false_negative_mask(local_rows, cand_rows, len(all_docs)).to(scores.device)
            mask[torch.arange(batch), own] = False  # the row's own positive stays
            scores = scores.masked_fill(mask, float("-inf"))
        per_row = nn.functional.cross_entropy(scores, own, reduction="none")

        if self.symmetric:
            # doc -> query: the other queries are negatives, except duplicates of the anchor and anchors
            # for which this document is also a known positive.
            back = cos_sim(docs[0], all_queries) * scale
            if self.mask_false_negatives:
                bmask = torch.zeros_like(back, dtype=torch.bool)
                for i, r in enumerate(local_rows):
                    item = self.ids.items[r][0]
                    for j, rj in enumerate(cand_rows):
                        if self.ids.anchor[rj] == self.ids.anchor[r] or item in self.ids.known[rj]:
                            bmask[i, j] = True
                bmask[torch.arange(batch), own] = False
                back = back.masked_fill(bmask, float("-inf"))
            per_row = 0.5 * (per_row + nn.functional.cross_entropy(back, own, reduction="none"))

        weights = torch.tensor([self.ids.weight[r] for r in local_rows], device=per_row.device, dtype=per_row.dtype)
        return (per_row * weights).sum() / weights.sum()

    def get_config_dict(self) -> dict:
        return {"scale": float(self.scale), "symmetric": self.symmetric,
                "mask_false_negatives": self.mask_false_negatives, "gather_across_devices": self.gather_across_devices}


class WeightedLoss(nn.Module):
    """Multiplies a loss by a constant: LARR's per-kind weights when several pair kinds train together."""

    def __init__(self, loss: nn.Module, weight: float):
        super().__init__()
        self.loss = loss
        self.weight = weight
        self.model = loss.model

    def forward(self, sentence_features, labels):
        out = self.loss(sentence_features, labels)
        if isinstance(out, dict):  # NoteLLM's joint loss returns its parts
            return {k: self.weight * v for k, v in out.items()}
        return self.weight * out


def build_loss(cfg: LossConfig, model, pairs: list[dict]):
    """The loss for one set of pairs, preferring sentence-transformers' implementations."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    directions = ("query_to_doc", "doc_to_query") if cfg.symmetric else ("query_to_doc",)
    partition = "per_direction" if cfg.symmetric else "joint"
    needs_custom = cfg.mask_false_negatives or cfg.learnable_temperature or cfg.use_pair_weights
    if needs_custom and cfg.gradcache_mini_batch:
        raise RecforgeError(
            "loss.gradcache_mini_batch (GradCache) cannot be combined with loss.mask_false_negatives or "
            "loss.learnable_temperature: set those to false, or drop gradcache_mini_batch"
        )
    if needs_custom:
        loss = InfoNCELoss(model, PairIdTable(pairs, cfg.use_pair_weights), cfg.temperature, cfg.learnable_temperature, cfg.symmetric,
                           cfg.mask_false_negatives, cfg.gather_across_devices)
    elif cfg.gradcache_mini_batch:
        loss = st_losses.CachedMultipleNegativesRankingLoss(
            model, scale=1.0 / cfg.temperature, mini_batch_size=cfg.gradcache_mini_batch,
            gather_across_devices=cfg.gather_across_devices, directions=directions, partition_mode=partition)
    else:
        loss = st_losses.MultipleNegativesRankingLoss(
            model, scale=1.0 / cfg.temperature, gather_across_devices=cfg.gather_across_devices,
            directions=directions, partition_mode=partition)
    if cfg.matryoshka_dims:
        full = model.get_embedding_dimension()
        dims = sorted({*cfg.matryoshka_dims, full}, reverse=True)
        loss = st_losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
