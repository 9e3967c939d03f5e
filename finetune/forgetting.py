"""Forgetting report: eval loss / perplexity per source before, during and after training.

`report.json` holds, per eval source (held-out domain text, general replay text...), the loss and
perplexity before and after and the relative change; `loss.png` and `perplexity.png` plot the curves.
"""

from __future__ import annotations

import math
from pathlib import Path

from recforge.io import atomic_path, atomic_write_json


def eval_curves(log_history: list[dict], sources: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) per eval source from the Trainer's log history."""
    curves: dict[str, list[tuple[int, float]]] = {s: [] for s in sources}
    for entry in log_history:
        for s in sources:
            key = f"eval_{s}_loss"
            if key in entry:
                curves[s].append((int(entry.get("step", 0)), float(entry[key])))
    return curves


def train_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def compare(before: dict, after: dict) -> dict:
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        out[name] = {
            "before": b,
            "after": a,
            "perplexity_change": (a["perplexity"] - b["perplexity"]) / b["perplexity"],
        }
    return out


def write_forgetting_report(out_dir: Path, before: dict, after: dict, log_history: list[dict], cfg) -> dict:
    sources = list(before)
    curves = eval_curves(log_history, sources)
    steps = max([e.get("step", 0) for e in log_history] or [0])
    # the before/after points frame the curve (step 0 and the last step)
    for s in sources:
        curves[s] = [(0, before[s]["loss"])] + curves[s] + ([(steps, after[s]["loss"])] if s in after else [])
    report = {
        "sources": compare(before, after),
        "train_loss": train_curve(log_history),
        "eval_loss": curves,
        "steps": steps,
        "mode": cfg.mode,
        "packing": cfg.packing,
    }
    atomic_write_json(out_dir / "report.json", report)
    plot_curves(out_dir / "loss.png", report["train_loss"], curves, "loss", perplexity=False)
    plot_curves(out_dir / "perplexity.png", [], curves, "perplexity", perplexity=True)
    return report


def plot_curves(path: Path, train: list, curves: dict, ylabel: str, perplexity: bool, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", alpha=0.5)
    for name, pts in curves.items():
        ys = [math.exp(min(v, 50.0)) if perplexity else v for _, v in pts]
        ax.plot([s for s, _ in pts], ys, marker="o", label=f"eval: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if perplexity:
        ax.set_yscale("log")
    ax.set_title(title or f"{ylabel} per source")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
