"""Training and evaluation of one CTR variant: BCE, AdamW, early stopping on validation AUC.

A plain PyTorch loop rather than the transformers Trainer: the model is a small tabular network fed
from in-memory arrays, and the Trainer's dataset/collator machinery would cost more than the model.
Metrics come from scikit-learn.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recforge.align.ctr_config import ModelConfig, TrainConfig
from recforge.align.ctr_data import SampleArrays
from recforge.align.ctr_models import CTRModel


@dataclass
class DenseInput:
    """A dense vector per item (rows indexed by item index, row 0 = padding) or per user (`user_rows`)."""

    name: str
    level: Literal["item", "user"]
    matrix: np.ndarray
    user_rows: dict[str, int] | None = None  # user id -> row (row 0 = zeros for users without a vector)

    def rows_for(self, split: SampleArrays) -> np.ndarray:
        if self.level == "item":
            return split.target
        return np.array([self.user_rows.get(u, 0) for u in split.user_ids], dtype=np.int64)


def _tensors(split: SampleArrays, dense: list[DenseInput]):
    base = (torch.from_numpy(split.target), torch.from_numpy(split.history),
            torch.from_numpy(split.history_rating), torch.from_numpy(split.label))
    return base, [torch.from_numpy(d.rows_for(split)) for d in dense]


@torch.no_grad()
def predict(model: CTRModel, split: SampleArrays, dense: list[DenseInput], mats: list[torch.Tensor], batch_size: int) -> np.ndarray:
    model.eval()
    (target, history, rating, _), rows = _tensors(split, dense)
    out = []
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(target[sl], history[sl], rating[sl], [m[r[sl]] for m, r in zip(mats, rows)])
        out.append(torch.sigmoid(logits))
    return torch.cat(out).numpy() if out else np.zeros(0)


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    probs = np.clip(probs, 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(labels, probs)), "logloss": float(log_loss(labels, probs, labels=[0, 1]))}


def train_ctr(
    splits: dict[str, SampleArrays],
    n_items: int,
    dense: list[DenseInput],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    adaptor: str | None,
    seed: int,
) -> dict:
    """Train on `train`, early-stop on `valid` AUC, report `test` metrics of the best epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    model = CTRModel(model_cfg, n_items, [d.matrix.shape[1] for d in dense], adaptor)
    mats = [torch.from_numpy(np.ascontiguousarray(d.matrix, dtype=np.float32)) for d in dense]
    optim = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train = splits["train"]
    (target, history, rating, label), rows = _tensors(train, dense)

    best_auc, best_state, best_epoch, stale, history_log = -1.0, None, -1, 0, []
    started = time.time()
    for epoch in range(train_cfg.max_epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train)))
        total = 0.0
        for start in range(0, len(train), train_cfg.batch_size):
            idx = order[start : start + train_cfg.batch_size]
            logits = model(target[idx], history[idx], rating[idx], [m[r[idx]] for m, r in zip(mats, rows)])
            loss = loss_fn(logits, label[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item() * len(idx)
        valid = metrics(splits["valid"].label, predict(model, splits["valid"], dense, mats, 8192))
        history_log.append({"epoch": epoch, "train_loss": total / len(train), "valid_auc": valid["auc"]})
        if valid["auc"] > best_auc + 1e-5:
            best_auc, best_state, best_epoch, stale = valid["auc"], copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= train_cfg.patience:
                break
    model.load_state_dict(best_state)
    test = metrics(splits["test"].label, predict(model, splits["test"], dense, mats, 8192))
    return {
        "seed": seed,
        "adaptor": adaptor,
        "dense_inputs": [d.name for d in dense],
        "best_epoch": best_epoch,
        "valid_auc": best_auc,
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "epochs": history_log,
        "train_seconds": round(time.time() - started, 2),
    }
