"""Training and evaluation of one CTR variant: BCE, AdamW, early stopping on validation AUC.

A plain PyTorch loop rather than the transformers Trainer: the model is a small tabular network fed
from in-memory arrays, and the Trainer's dataset/collator machinery would cost more than the model.
Metrics come from scikit-learn.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from recforge.align.ctr.config import ModelConfig, TrainConfig
from recforge.align.ctr.data import SampleArrays
from recforge.align.ctr.models import CTRModel


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


def train_ctr(*args, **kwargs) -> dict:
    """`train_ctr_model`'s result only: train on `train`, early-stop on `valid` AUC, `test` metrics of the best epoch."""
    return train_ctr_model(*args, **kwargs)[1]


def train_ctr_model(
    splits: dict[str, SampleArrays],
    n_items: int,
    dense: list[DenseInput],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    adaptor: str | None,
    seed: int,
    keep_probs: bool = False,
) -> tuple[CTRModel, dict]:
    """`train_ctr`, also returning the trained model (LARR aligns to an IDs-only model's collaborative vectors).

    `keep_probs`: the result also holds `test_probs` (the verdict's paired bootstrap needs them; not JSON)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    model = CTRModel(model_cfg, n_items, [d.matrix.shape[1] for d in dense], adaptor)
    mats = [torch.from_numpy(np.ascontiguousarray(d.matrix, dtype=np.float32)) for d in dense]
    optim = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    (target, history, rating, label), rows = _tensors(splits["train"], dense)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = model(target[idx], history[idx], rating[idx], [m[r[idx]] for m, r in zip(mats, rows)])
        return loss_fn(logits, label[idx])

    fitted = fit(model, optim, len(splits["train"]), batch_loss,
                 lambda: predict(model, splits["valid"], dense, mats, 8192), splits["valid"].label, train_cfg, rng)
    probs = predict(model, splits["test"], dense, mats, 8192)
    test = metrics(splits["test"].label, probs)
    result = {"seed": seed, "adaptor": adaptor, "dense_inputs": [d.name for d in dense], **fitted.result(test)}
    if keep_probs:
        result["test_probs"] = probs
    return model, result


@dataclass
class Fitted:
    best_epoch: int
    valid_auc: float
    epochs: list[dict]
    seconds: float

    def result(self, test: dict[str, float]) -> dict:
        return {"best_epoch": self.best_epoch, "valid_auc": self.valid_auc, "test_auc": test["auc"],
                "test_logloss": test["logloss"], "epochs": self.epochs, "train_seconds": round(self.seconds, 2)}


def fit(
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    n_train: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    valid_probs: Callable[[], np.ndarray],
    valid_labels: np.ndarray,
    train_cfg: TrainConfig,
    rng: np.random.Generator,
    progress: bool = False,
) -> Fitted:
    """The epoch loop every CTR model shares: shuffled batches, AdamW, early stopping on validation AUC.

    `batch_loss(idx)` is the loss of the training rows `idx` (BCE, plus LARR's alignment term); the model
    ends on its best epoch's weights.
    """
    best_auc, best_state, best_epoch, stale, history_log = -1.0, None, -1, 0, []
    started = time.time()
    for epoch in range(train_cfg.num_train_epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n_train))
        total = 0.0
        starts = range(0, n_train, train_cfg.per_device_train_batch_size)
        for start in tqdm(starts, desc=f"epoch {epoch}", leave=False) if progress else starts:
            idx = order[start : start + train_cfg.per_device_train_batch_size]
            loss = batch_loss(idx)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item() * len(idx)
        valid = metrics(valid_labels, valid_probs())
        history_log.append({"epoch": epoch, "train_loss": total / n_train, "valid_auc": valid["auc"]})
        if valid["auc"] > best_auc + 1e-5:
            best_auc, best_state, best_epoch, stale = valid["auc"], copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= train_cfg.early_stopping_patience:
                break
    model.load_state_dict(best_state)
    return Fitted(best_epoch, best_auc, history_log, time.time() - started)
