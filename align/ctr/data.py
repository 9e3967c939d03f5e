"""CTR samples from behaviour logs, with KAR's leakage guard and a user split.

Per user, events are ordered by time. The first min((n+1)//2, max_prompt_items) events feed the
text features only (the user's history text, knowledge prompts) and never become CTR samples;
every later event is a sample whose label is `label >= positive_threshold` and whose behaviour
history is the user's preceding events. Users are split train/valid/test by the project's one split rule
(`recforge.splits`): the test users are the rule's held-out users (`is_eval("user", id)`, the users
data_recipes holds out), so a user's samples never straddle train and test.

The new-item split (`new_items.enabled`) also holds items out by the same rule (`is_eval("item", id)`): a
held-out item is never a training or validation target, and test samples are reported separately for warm
and new targets. `new_items.history` says whether a held-out item may still appear inside training / validation
histories (`keep`, how a new item enters logs) or is dropped from them (`remove`, strict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recforge.records import Item
from recforge.splits import DEFAULT_RULE, KAR_MAX_PROMPT_ITEMS, SplitRule, bucket, describe, is_eval, kar_prefix_length, percent


def assign_user_splits(user_ids: list[str], rule: SplitRule = DEFAULT_RULE, valid_percent: int = 10) -> dict[str, str]:
    """test: the rule's held-out users (bucket < `eval_percent.user`); valid: the next `valid_percent` buckets
    (early stopping); train: the rest."""
    test = percent("user", rule)
    splits = {}
    for user in user_ids:
        b = bucket("user", user, rule)
        splits[user] = "test" if b < test else "valid" if b < test + valid_percent else "train"
    return splits


def describe_user_split(rule: SplitRule, valid_percent: int) -> dict[str, str]:
    """The CTR user split in words, for the report and manifest."""
    test = percent("user", rule)
    return {"test": describe("user", rule),
            "valid": f"{test} <= sha256({rule.salt!r} + 'user:<id>') % 100 < {test + valid_percent}",
            "train": "the other users"}


def apply_leakage_guard(events: pl.DataFrame, max_prompt_items: int = KAR_MAX_PROMPT_ITEMS) -> pl.DataFrame:
    """Order each user's events and mark the prompt-only prefix (`is_prompt`) and positions (`pos`, `n`).

    The prefix is `recforge.splits.kar_prefix_length`, the rule generate's prompts use too."""
    ordered = events.sort(["user_id", "timestamp", "line"], nulls_last=True).with_columns(
        pos=pl.int_range(pl.len()).over("user_id"),
        n=pl.len().over("user_id"),
    )
    lengths = {n: kar_prefix_length(n, max_prompt_items) for n in ordered["n"].unique().to_list()}
    prefix = ordered["n"].replace_strict(lengths, return_dtype=pl.Int64) if lengths else pl.Series([], dtype=pl.Int64)
    return ordered.with_columns(is_prompt=pl.col("pos") < prefix)


@dataclass
class SampleArrays:
    """Model inputs of one split; row i is one CTR sample."""

    user_ids: np.ndarray  # object array of user id strings
    target: np.ndarray  # (B,) item index (1..N; 0 = padding)
    history: np.ndarray  # (B, L) item indices of preceding events, most recent last, 0-padded on the left
    history_rating: np.ndarray  # (B, L) rating bucket of those events (0 = padding)
    label: np.ndarray  # (B,) float32 0/1
    timestamp: np.ndarray | None = None  # (B,) float64 event time (LARR's time-context feature); NaN where absent

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray) -> "SampleArrays":
        ts = self.timestamp[idx] if self.timestamp is not None else None
        return SampleArrays(self.user_ids[idx], self.target[idx], self.history[idx], self.history_rating[idx], self.label[idx], ts)


@dataclass
class CTRData:
    item_ids: list[str]  # item_ids[i - 1] is the item of index i
    splits: dict[str, SampleArrays]
    prompt_events: pl.DataFrame  # the guarded prefix of each user: text features only
    stats: dict[str, Any] = field(default_factory=dict)
    held_out_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # item indices (new-item split)

    def test_groups(self) -> dict[str, np.ndarray]:
        """Row indices of the test split: `warm` (target seen as a training target) and `new` (held-out target)."""
        test = self.splits["test"]
        new = np.isin(test.target, self.held_out_items)
        return {"warm": np.flatnonzero(~new), "new": np.flatnonzero(new)}

    @property
    def item_index(self) -> dict[str, int]:
        return {item: i + 1 for i, item in enumerate(self.item_ids)}


def build_ctr_data(
    events: pl.DataFrame,
    items: list[Item],
    *,
    positive_threshold: float,
    max_prompt_items: int,
    history_length: int,
    rule: SplitRule = DEFAULT_RULE,
    valid_percent: int = 10,
    new_items: bool = False,
    new_item_history: str = "keep",
) -> CTRData:
    """Events (readers' interaction frame, `label` = rating) -> guarded, split sample arrays.

    `new_items`: items the rule holds out (`is_eval("item", id, rule)`) are dropped as train / valid targets;
    `new_item_history="remove"` also drops them from train / valid histories (strict)."""
    stats: dict[str, Any] = {"events": events.height}
    no_label = events.filter(pl.col("label").is_null() | pl.col("item_id").is_null())
    stats["events_without_label_or_item"] = no_label.height  # cannot be samples; reported, not dropped unseen
    events = events.filter(pl.col("label").is_not_null() & pl.col("item_id").is_not_null())
    guarded = apply_leakage_guard(events, max_prompt_items)

    catalogue = sorted({it.item_id for it in items})
    extra = sorted(set(guarded["item_id"].unique().to_list()) - set(catalogue))
    stats["event_items_not_in_catalogue"] = len(extra)
    item_ids = catalogue + extra
    index = {item: i + 1 for i, item in enumerate(item_ids)}

    item_idx = np.array([index[i] for i in guarded["item_id"].to_list()], dtype=np.int64)
    ratings = np.clip(np.rint(guarded["label"].to_numpy()), 0, 10).astype(np.int64)
    pos = guarded["pos"].to_numpy()
    is_prompt = guarded["is_prompt"].to_numpy()
    users = guarded["user_id"].to_numpy().astype(object)
    labels = (guarded["label"].to_numpy() >= positive_threshold).astype(np.float32)
    times = guarded["timestamp"].cast(pl.Float64).fill_null(float("nan")).to_numpy()

    # History of the event at global row r: rows r-L .. r-1 of the same user (rows are user-contiguous).
    rows = np.flatnonzero(~is_prompt)
    history, history_rating = _histories(rows, pos, item_idx, ratings, history_length, np.ones(len(item_idx), bool))

    held_items = np.array(sorted(index[i] for i in item_ids if is_eval("item", i, rule)), dtype=np.int64) if new_items \
        else np.zeros(0, np.int64)
    user_split = assign_user_splits(sorted(set(users[rows])), rule, valid_percent)
    split_of_row = np.array([user_split[u] for u in users[rows]], dtype=object)
    if new_items and new_item_history == "remove":  # strict: held-out items leave train / valid histories
        fit_rows = split_of_row != "test"
        strict_h, strict_r = _histories(rows[fit_rows], pos, item_idx, ratings, history_length, ~np.isin(item_idx, held_items))
        history[fit_rows], history_rating[fit_rows] = strict_h, strict_r
    all_samples = SampleArrays(users[rows], item_idx[rows], history, history_rating, labels[rows], times[rows])
    new_target = np.isin(item_idx[rows], held_items)
    splits = {name: all_samples.take(np.flatnonzero((split_of_row == name) & ((name == "test") | ~new_target)))
              for name in ("train", "valid", "test")}

    stats.update({
        "users": int(guarded["user_id"].n_unique()),
        "prompt_only_events": int(is_prompt.sum()),
        "samples": {k: len(v) for k, v in splits.items()},
        "positive_rate": {k: round(float(v.label.mean()), 4) if len(v) else None for k, v in splits.items()},
        "users_per_split": {k: int(len(set(v.user_ids))) for k, v in splits.items()},
        "user_split": describe_user_split(rule, valid_percent),
    })
    if new_items:
        test_new = np.isin(splits["test"].target, held_items)
        stats["new_items"] = {
            "rule": describe("item", rule), "history": new_item_history, "held_out_items": int(len(held_items)),
            "held_out_items_with_test_samples": int(len(np.unique(splits["test"].target[test_new]))),
            "dropped_train_valid_samples": int(((split_of_row != "test") & new_target).sum()),
            "test_samples": {"warm": int((~test_new).sum()), "new": int(test_new.sum())},
        }
    return CTRData(item_ids, splits, guarded.filter(pl.col("is_prompt")), stats, held_items)


def _histories(rows: np.ndarray, pos: np.ndarray, item_idx: np.ndarray, ratings: np.ndarray, length: int,
               usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) item / rating history of each sample row: the last `length` usable events of the same user before
    it, most recent last, 0-padded on the left (rows are user-contiguous and time-ordered)."""
    kept = np.flatnonzero(usable)
    before = np.searchsorted(kept, rows)  # usable rows before r (all users)
    first = np.searchsorted(kept, rows - pos[rows])  # the user's first usable row, as a position in `kept`
    offsets = before[:, None] - length + np.arange(length)[None, :]
    valid = offsets >= first[:, None]
    safe = kept[np.where(valid, offsets, 0)] if len(kept) else np.zeros(offsets.shape, np.int64)
    return np.where(valid, item_idx[safe], 0), np.where(valid, ratings[safe], 0)


def subsample(split: SampleArrays, n: int | None, seed: int) -> SampleArrays:
    """A fixed random subset of `n` rows (all rows when n is None or not smaller), in the original order."""
    if n is None or n >= len(split):
        return split
    return split.take(np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False)))


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def render_template(template: str, values: dict[str, Any]) -> str:
    """`{title} by {authors}` over a record: lists joined with ', ', missing fields empty."""
    flat = _Blank({k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items() if v is not None})
    try:
        return " ".join(template.format_map(flat).split())
    except (ValueError, TypeError):  # a numeric format spec on a missing (empty) value
        return " ".join(template.format_map(_Blank({k: str(v) for k, v in flat.items()})).split())


def item_texts(items: list[Item], template: str) -> dict[str, str]:
    return {it.item_id: render_template(template, it.fields) for it in items}


def user_history_texts(
    prompt_events: pl.DataFrame,
    items: dict[str, Item],
    *,
    user_template: str,
    history_item_template: str,
    max_history_items: int,
    profiles: dict[str, dict[str, Any]] | None = None,
    profile_template: str = "",
) -> dict[str, str]:
    """One text per user from the guarded prefix only (so text features never see a sample's label)."""
    texts = {}
    for (user,), group in prompt_events.group_by(["user_id"], maintain_order=True):
        group = group.sort("pos").tail(max_history_items)
        parts = []
        for item_id, rating in zip(group["item_id"].to_list(), group["label"].to_list()):
            fields = dict(items[item_id].fields) if item_id in items else {"title": f"item {item_id}"}
            parts.append(render_template(history_item_template, {**fields, "rating": rating}))
        profile = render_template(profile_template, (profiles or {}).get(user, {})) + " " if profile_template else ""
        texts[user] = render_template(user_template, {"profile": profile, "history": "; ".join(parts)})
    return texts
