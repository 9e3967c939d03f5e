"""A compact CTR model: DIN or DCN-v2 over ID embeddings and behaviour history, plus dense
vectors (text embeddings, generated knowledge) through KAR's hybrid-expert adaptor or a plain MLP.

Written in plain PyTorch on purpose: the models are a few hundred lines in total, and a ranking
team's own backbone replaces them; what matters is the adaptor contract (one `adaptor_dim` vector
per dense input, appended to the backbone input).
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.align.ctr.config import ModelConfig


def mlp(sizes: list[int], final_activation: bool = True, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class KARAdaptor(nn.Module):
    """Hybrid-expert adaptor (KAR): shared experts + per-input experts, a softmax gate per input.

    Each dense input j gets `sum_e gate_j(x_j)[e] * expert_e(x_j)` over the shared experts and its own
    experts; an expert is an MLP dim -> hidden -> out. Output: one `out_dim` vector per input.
    Inputs of different sizes (a 384-d text vector beside a 7-d judgement) reach the shared experts through a
    linear map to the largest size; inputs of one size go to them as they are (KAR's setting).
    """

    def __init__(self, input_dims: list[int], hidden: int, out_dim: int, n_shared: int, n_specific: int):
        super().__init__()
        dim = max(input_dims) if input_dims else 0
        self.to_shared = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(d, dim) for d in input_dims)
        self.shared = nn.ModuleList(mlp([dim, hidden, out_dim]) for _ in range(n_shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(mlp([d, hidden, out_dim]) for _ in range(n_specific)) for d in input_dims
        )
        self.gates = nn.ModuleList(nn.Linear(d, n_shared + n_specific) for d in input_dims)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for x, own, gate, proj in zip(inputs, self.specific, self.gates, self.to_shared):
            shared_x = proj(x)
            experts = torch.stack([e(shared_x) for e in self.shared] + [e(x) for e in own], dim=1)  # (B, E, out)
            weights = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # (B, E, 1)
            outs.append((weights * experts).sum(dim=1))
        return outs


class MLPAdaptor(nn.Module):
    """The baseline adaptor: one MLP per dense input."""

    def __init__(self, input_dims: list[int], hidden: int, out_dim: int):
        super().__init__()
        self.nets = nn.ModuleList(mlp([d, hidden, out_dim]) for d in input_dims)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net(x) for net, x in zip(self.nets, inputs)]


class TargetAttention(nn.Module):
    """DIN's activation unit: weights from [h, t, h-t, h*t], not normalised by softmax (as in DIN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(4 * dim, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.unsqueeze(1).expand_as(history)
        w = self.unit(torch.cat([history, t, history - t, history * t], dim=-1)).squeeze(-1)
        w = w * mask
        return (w.unsqueeze(-1) * history).sum(dim=1)


class CTRModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_items: int, dense_dims: list[int], adaptor: str | None):
        super().__init__()
        d = cfg.embed_dim
        # BAHE / LLM-CTR put an LLM tower in front of the same DIN or DCN head (`model.head`)
        self.backbone = cfg.backbone if cfg.backbone in ("din", "dcn") else cfg.head
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.rating_emb = nn.Embedding(11, d, padding_idx=0)
        # Small init (as CTR libraries do): an item never seen in training then stays near zero
        # instead of injecting N(0, 1) noise into the prediction.
        for emb in (self.item_emb, self.rating_emb):
            nn.init.normal_(emb.weight, std=0.01)
            emb.weight.data[0].zero_()
        if not dense_dims:
            self.adaptor = None
        elif adaptor == "kar":
            self.adaptor = KARAdaptor(dense_dims, cfg.expert_hidden, cfg.adaptor_dim, cfg.n_shared_experts, cfg.n_specific_experts)
        elif adaptor == "mlp":
            self.adaptor = MLPAdaptor(dense_dims, cfg.expert_hidden, cfg.adaptor_dim)
        else:
            raise ValueError(f"unknown adaptor {adaptor!r}")
        width = 2 * d + len(dense_dims) * cfg.adaptor_dim
        if self.backbone == "din":
            self.attention = TargetAttention(d)
            self.head = nn.Sequential(mlp([width, *cfg.mlp_hidden], dropout=cfg.dropout), nn.Linear(cfg.mlp_hidden[-1], 1))
        else:  # DCN-v2: full-rank cross layers next to a deep tower
            self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cfg.cross_layers))
            self.deep = mlp([width, *cfg.mlp_hidden], dropout=cfg.dropout)
            self.head = nn.Linear(width + cfg.mlp_hidden[-1], 1)

    def forward(self, target, history, history_rating, dense: list[torch.Tensor]) -> torch.Tensor:
        return self.logits_and_collaborative(target, history, history_rating, dense)[0]

    def logits_and_collaborative(self, target, history, history_rating, dense: list[torch.Tensor]):
        """The click logit and the collaborative (ID) representation [target item; pooled history], 2 x embed_dim.

        LARR aligns its scene vector with the second; `forward` is the first alone.
        """
        t = self.item_emb(target)
        h = self.item_emb(history) + self.rating_emb(history_rating)
        mask = (history > 0).float()
        extras = self.adaptor(dense) if self.adaptor is not None else []
        if self.backbone == "din":
            pooled = self.attention(h, t, mask)
            return self.head(torch.cat([t, pooled, *extras], dim=-1)).squeeze(-1), torch.cat([t, pooled], dim=-1)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        x0 = torch.cat([t, pooled, *extras], dim=-1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1), torch.cat([t, pooled], dim=-1)
