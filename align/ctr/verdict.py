"""The CTR verdict (issue 24): floors, paired bootstrap intervals over test users, warm / new-item breakdown, cost.

- Floors every report carries: a logistic regression (scikit-learn) on the DIN's own inputs (target item
  one-hot, history items, the history's rating histogram), its C picked on the validation users, and the
  item-popularity floor (how often the target was a training target).
- Paired deltas: each variant's test AUC minus the tuned IDs-only model's, with a percentile interval from a
  bootstrap over test users. One matrix of user resamples is drawn per report and used for every variant and
  every sample group, so all intervals are paired the same way. A resample's AUC weights each sample by how many
  times its user was drawn (the AUC of the resampled set, ties counted half).
- Groups: `warm` (test samples whose target was a training target) and `new` (held-out targets).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from recforge.io import atomic_write_json, atomic_write_text

BASE = "ids_only"


# ------------------------------------------------------------------------------------------- cost accounting


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread) and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stopwatch:
    """Wall and CPU seconds of a block: `with Stopwatch() as sw: ...; sw.wall, sw.cpu`."""

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.time(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.time() - self._wall
        self.cpu = cpu_seconds() - self._cpu


def generation_cost(run_dir: str) -> dict[str, Any]:
    """What a `recforge generate` (or `align`) run cost, from its manifest (`elapsed_s`, wall seconds of its last invocation) and
    resolved config (model, engine, threads). CPU-hours = wall x engine.cpu_threads: an upper bound, since the engine
    may run in its own process where this one cannot measure it."""
    import yaml

    from recforge.io import resolve_path

    root = resolve_path(run_dir)
    path = root / "manifest.json" if root.is_dir() else root
    shards = sorted(root.glob("shard-*/manifest.json")) if root.is_dir() and not path.is_file() else []
    if shards:  # data-parallel shards: wall = the slowest shard, CPU bound = the sum over shards
        parts = [generation_cost(str(s.parent)) for s in shards]
        walls = [p_["wall_seconds"] for p_ in parts if p_.get("wall_seconds") is not None]
        return {"source": str(root), "shards": len(parts), "wall_seconds": max(walls) if walls else None,
                "threads": sum(p_.get("threads") or 1 for p_ in parts), "model": parts[0].get("model"),
                "engine": parts[0].get("engine"), "rows": sum(p_.get("rows") or 0 for p_ in parts) or None,
                "status": sorted({str(p_.get("status")) for p_ in parts}),
                "cpu_hours": round(sum(p_.get("cpu_hours") or 0 for p_ in parts), 4),
                "cpu_hours_method": "sum over shards of wall x engine.cpu_threads (upper bound)"}
    if not path.is_file():
        return {"source": str(run_dir), "missing": "no manifest.json: generation cost unknown"}
    m = json.loads(path.read_text(encoding="utf-8"))
    wall = m.get("elapsed_s") or m.get("duration_seconds") or m.get("wall_seconds")
    if wall is None and m.get("started_at") and m.get("finished_at"):
        wall = _seconds_between(m["started_at"], m["finished_at"])
    cfg_path = path.parent / "resolved_config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}) if cfg_path.is_file() else {}
    engine = cfg.get("engine") or {}
    threads = engine.get("cpu_threads") or 1
    out = {"source": str(path), "status": m.get("status"), "wall_seconds": None if wall is None else round(float(wall), 1),
           "threads": threads, "model": (cfg.get("model") or {}).get("name_or_path"), "engine": engine.get("kind"),
           "rows": sum(o.get("rows") or 0 for o in m.get("outputs", []) if isinstance(o, dict)) or None}
    if wall is not None:
        out["cpu_hours"] = round(float(wall) * threads / 3600, 4)
        out["cpu_hours_method"] = "wall x engine.cpu_threads (upper bound)"
    return out


def _seconds_between(a: str, b: str) -> float | None:
    from datetime import datetime

    try:
        return (datetime.fromisoformat(b.replace("Z", "+00:00")) - datetime.fromisoformat(a.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------- floors


def logistic_features(split, n_items: int):
    """Sparse [target one-hot | history items (each 1/len) | rating histogram of the history (fractions)]."""
    import scipy.sparse as sp

    n, width = len(split), n_items + 1
    rows = np.arange(n)
    target = sp.csr_matrix((np.ones(n), (rows, split.target)), shape=(n, width))
    mask = split.history > 0
    lengths = np.maximum(mask.sum(1), 1)
    r, c = np.nonzero(mask)
    hist = sp.csr_matrix((1.0 / lengths[r], (r, split.history[r, c])), shape=(n, width))
    ratings = np.zeros((n, 11))
    np.add.at(ratings, (r, split.history_rating[r, c]), 1.0)
    ratings /= lengths[:, None]
    return sp.hstack([target, hist, sp.csr_matrix(ratings)], format="csr")


def logistic_floor(splits: dict, n_items: int, c_grid: list[float]) -> dict[str, Any]:
    """Logistic regression on the DIN's inputs; C chosen by validation AUC. Returns test probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    with Stopwatch() as sw:
        x = {k: logistic_features(v, n_items) for k, v in splits.items()}
        trials, best = [], None
        for c in c_grid:
            model = LogisticRegression(C=c, max_iter=1000, solver="lbfgs")
            model.fit(x["train"], splits["train"].label)
            valid = float(roc_auc_score(splits["valid"].label, model.predict_proba(x["valid"])[:, 1]))
            trials.append({"C": c, "valid_auc": round(valid, 5)})
            if best is None or valid > best[0]:
                best = (valid, c, model)
        test = best[2].predict_proba(x["test"])[:, 1]
    return {"name": "logistic_regression", "chosen": {"C": best[1]}, "valid_auc": best[0], "trials": trials,
            "test_probs": test, "cost": {"train_wall_seconds": round(sw.wall, 2), "train_cpu_seconds": round(sw.cpu, 2)}}


def popularity_floor(splits: dict, n_items: int) -> dict[str, Any]:
    """Score = how many training samples had the target as their target (new items: 0)."""
    counts = np.bincount(splits["train"].target, minlength=n_items + 1).astype(np.float64)
    return {"name": "item_popularity", "chosen": {}, "test_probs": counts[splits["test"].target],
            "cost": {"train_wall_seconds": 0.0, "train_cpu_seconds": 0.0}}


# -------------------------------------------------------------------------------------------------- bootstrap


def user_resample_weights(user_ids: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) sample weights: how often each sample's user was drawn in each bootstrap over users."""
    users, inverse = np.unique(np.asarray(user_ids, dtype=str), return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(users), size=(resamples, len(users)))
    counts = np.zeros((resamples, len(users)), np.float32)
    np.add.at(counts, (np.repeat(np.arange(resamples), len(users)), draws.ravel()), 1.0)
    return counts[:, inverse]


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `weights` ((R, n) or (n,)) as sample weights; tied scores count half.

    Equals sklearn's roc_auc_score(labels, scores, sample_weight=w) row by row (a test checks it), but sorts once.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="mergesort")
    s, y, w = np.asarray(scores)[order], np.asarray(labels)[order] > 0.5, w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, int)
    pos = np.add.reduceat(w * y, starts, axis=1) if len(s) else np.zeros((len(w), 0))
    neg = np.add.reduceat(w * ~y, starts, axis=1) if len(s) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def paired_delta(variant_scores: list[np.ndarray], base_scores: list[np.ndarray], labels: np.ndarray,
                 weights: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean-over-seeds AUC difference (variant seed s minus base seed s; a single-run floor against every base
    seed) on the full set, and its percentile interval over the bootstrap rows of `weights`."""
    ones = np.ones((1, len(labels)))
    return delta_from_aucs([(weighted_auc(v, labels, ones)[0], weighted_auc(v, labels, weights)) for v in variant_scores],
                           [(weighted_auc(b, labels, ones)[0], weighted_auc(b, labels, weights)) for b in base_scores], level)


def delta_from_aucs(variant: list[tuple[float, np.ndarray]], base: list[tuple[float, np.ndarray]], level: float) -> dict[str, Any]:
    """`paired_delta` from precomputed (full-set AUC, bootstrap AUCs) per seed, so each model's resampled AUCs are
    computed once per group and shared by every comparison."""
    k = max(len(variant), len(base))
    pairs = [(variant[i % len(variant)], base[i % len(base)]) for i in range(k)]
    point = float(np.mean([v[0] - b[0] for v, b in pairs]))
    boot = np.mean([v[1] - b[1] for v, b in pairs], axis=0)
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    lo, hi = (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))) if len(boot) else (float("nan"),) * 2
    return {"delta": point, "ci_low": lo, "ci_high": hi, "level": level, "resamples": int(len(boot)),
            "excludes_zero": bool(lo > 0 or hi < 0)}


# ---------------------------------------------------------------------------------------------------- verdict


def group_metrics(entries: dict[str, dict], labels: np.ndarray, user_ids: np.ndarray, groups: dict[str, np.ndarray],
                  resamples: int, seed: int, level: float) -> dict[str, dict]:
    """entries: name -> {"scores": [per-seed test probs]}. Per group: AUC mean/sd over seeds, paired Δ vs IDs-only."""
    weights_all = user_resample_weights(user_ids, resamples, seed)  # one draw, shared by every variant and group
    out: dict[str, dict] = {name: {} for name in entries}
    for group, idx in groups.items():
        y = labels[idx]
        if len(idx) == 0 or y.min() == y.max():
            for name in entries:
                out[name][group] = {"samples": int(len(idx)), "auc_mean": None, "reason": "no samples or one class only"}
            continue
        w = weights_all[:, idx]
        ones = np.ones((1, len(idx)))
        aucs_of = {name: [(weighted_auc(s[idx], y, ones)[0], weighted_auc(s[idx], y, w)) for s in e["scores"]]
                   for name, e in entries.items()}
        for name in entries:
            aucs = np.array([a for a, _ in aucs_of[name]])
            row = {"samples": int(len(idx)), "users": int(len(np.unique(np.asarray(user_ids)[idx]))),
                   "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
                   "seeds": len(aucs)}
            if BASE in entries and name != BASE:
                row.update(delta_from_aucs(aucs_of[name], aucs_of[BASE], level))
            out[name][group] = row
    return out


def _fmt_delta(row: dict | None) -> str:
    if not row or row.get("delta") is None:
        return "—"
    star = " ✔" if row["excludes_zero"] else ""
    return f"{row['delta']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]{star}"


def _fmt_auc(row: dict | None) -> str:
    if not row or row.get("auc_mean") is None:
        return "—"
    return f"{row['auc_mean']:.4f} ± {row['auc_std']:.4f}"


def _fmt_cost(cost: dict) -> str:
    wall, cpu_h = cost.get("total_wall_seconds"), cost.get("total_cpu_hours")
    return "—" if wall is None else f"{wall:,.0f} s / {cpu_h:.3f} CPU-h"


def verdict_markdown(verdict: dict) -> str:
    g = verdict["groups"]
    lines = [f"## CTR verdict: {verdict['name']} ({verdict['model']})", "",
             f"Test users: {verdict['test_users']}; test samples: " + ", ".join(f"{k} {v}" for k, v in verdict["test_samples"].items())
             + f". Δ = test AUC minus the tuned IDs-only {verdict['model']} (paired by seed), "
             f"[{int(verdict['level'] * 100)} % bootstrap interval over test users, {verdict['resamples']} resamples shared "
             "by every row]; ✔ = the interval excludes 0.", ""]
    if verdict.get("new_items"):
        ni = verdict["new_items"]
        lines += [f"New items: {ni['held_out_items']} items held out by `{ni['rule']}` (never a training or validation "
                  f"target; history mode `{ni['history']}`), {ni['held_out_items_with_test_samples']} of them targets of test samples.", ""]
    head = "| variant | inputs | seeds |" + "".join(f" {k} AUC | {k} Δ [CI] |" for k in g) + " cost (gen + encode + train) |"
    lines += [head, "|---|---|---:|" + "---:|---:|" * len(g) + "---:|"]
    for r in verdict["rows"]:
        cells = "".join(f" {_fmt_auc(r['groups'].get(k))} | {_fmt_delta(r['groups'].get(k))} |" for k in g)
        lines.append(f"| {r['variant']} | {', '.join(r['inputs']) or r.get('kind', '-')} | {r['seeds']} |{cells} {_fmt_cost(r['cost'])} |")
    lines += ["", "Which differences exclude 0: " + (", ".join(verdict["excluding_zero"]) or "none") + ".", ""]
    for variant, reasons in (verdict.get("skipped_variants") or {}).items():
        lines.append(f"- not run: {variant} ({'; '.join(f'{i}: {r}' for i, r in reasons.items())})")
    if verdict.get("skipped_variants"):
        lines.append("")
    tuned = verdict.get("tuning")
    if tuned:
        lines += [f"Tuning: every variant tried the same {tuned['budget']} settings (seed {tuned['seed']}, validation users, "
                  "early stopping on validation AUC); chosen:", ""]
        lines += [f"- {v}: {json.dumps(c)} (valid AUC {a:.4f})" for v, (c, a) in tuned["chosen"].items()]
        lines += ["", "Settings tried (each variant): " + "; ".join(json.dumps(c) for c in tuned["candidates"]), ""]
    for f in verdict.get("floors_chosen", []):
        lines.append(f"- floor {f['name']}: {json.dumps(f['chosen'])}")
    if verdict.get("goals"):
        lines += ["", "Goals:", ""] + [f"- {g_['goal']}: **{'met' if g_['met'] else 'missed'}** ({g_['detail']})" for g_ in verdict["goals"]]
    if verdict.get("machine"):
        lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in verdict["machine"].items())]
    return "\n".join(lines) + "\n"


def plot_verdict(verdict: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in verdict["rows"] if r["variant"] != BASE]
    groups = list(verdict["groups"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.8 / max(1, len(groups))
    for gi, group in enumerate(groups):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            cell = r["groups"].get(group) or {}
            if cell.get("delta") is None:
                continue
            xs.append(i + (gi - (len(groups) - 1) / 2) * width)
            ys.append(cell["delta"])
            lo.append(cell["delta"] - cell["ci_low"])
            hi.append(cell["ci_high"] - cell["delta"])
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=f"{group} targets", color=["#3b7dd8", "#e08a2c", "#888"][gi % 3])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8, rotation=20)
    ax.set_ylabel(f"Δ test AUC vs tuned IDs-only [{int(verdict['level'] * 100)} % CI]")
    ax.set_title(f"{verdict['name']}: {verdict['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_verdict(verdict: dict, out: Path) -> None:
    atomic_write_json(out / "verdict.json", verdict)
    atomic_write_text(out / "verdict.md", verdict_markdown(verdict))
    plot_verdict(verdict, out / "verdict.png")
