"""bench/gpu_check.py's `align` part: one epoch of `align.trainer.train_model` (SentenceTransformerTrainer) with
`make demo`'s align/recipes/esci_smollm2.yaml on a random-init SmolLM2 backbone: pairs/s, step time, peak memory.
The GPU image has no polars: `without_polars_leakage_check` swaps in the same id-overlap report computed with sets.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gpu_check_common import ROOT, Clock, ensure_recforge, peak_gib, random_model, reset_peak, sync


def without_polars_leakage_check() -> str | None:
    """The GPU image has no polars (its wheel, 54 MB, cannot travel within 64 MiB). The align data path needs it only
    for `recforge.splits.leakage_check`, a train/eval id overlap report: where polars is missing, swap in the same
    report computed with Python sets, and say so in the results."""
    try:
        import polars  # noqa: F401

        return None
    except ImportError:
        pass
    import recforge.align.pairs as pairs
    import recforge.splits as splits

    def leakage_check(train_ids, eval_ids, unit: str, method: str, split: str | None = None) -> dict:
        train, evals = set(map(str, train_ids)), list(dict.fromkeys(map(str, eval_ids)))
        leaked = [i for i in evals if i in train]
        report = {"unit": unit, "method": method, "train_ids": len(train), "eval_ids": len(evals),
                  "eval_ids_in_train": len(leaked), "leaked_examples": leaked[:5], "ok": not leaked}
        if split is not None:
            report["split"] = split
        return report

    splits.leakage_check = leakage_check
    pairs.leakage_check = leakage_check
    return "polars missing: recforge.splits.leakage_check (the id-overlap report) computed with Python sets instead"


def part_align(args, clock: Clock) -> dict:
    import torch
    from transformers import set_seed

    ensure_recforge()
    from recforge.align.align_config import AlignConfig
    from recforge.align.pairs import load_align_data
    from recforge.align.pooling import build_embedding_model
    from recforge.align.trainer import prompts_of, train_model, wrap_lora
    from recforge.config import load_recipe

    device = args.device
    work = Path(args.work)
    model_dir = random_model("smollm2", work, args.smoke)
    out_dir = work / "align_smollm2"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [f"backbone.path={model_dir}", f"out_dir={out_dir}", "train.num_train_epochs=1"]
    if device.startswith("cuda"):
        overrides.append("train.bf16=true")  # the demo recipe turns bf16 off for CPUs without AVX512-BF16 / AMX
    if args.smoke:
        overrides += [f"train.max_steps={args.steps}", "train.per_device_train_batch_size=4"]
    cfg = load_recipe(AlignConfig, ROOT / "align/recipes/esci_smollm2.yaml", overrides)
    set_seed(cfg.seed)
    patched = without_polars_leakage_check()
    data = load_align_data(cfg.data)
    model, info = build_embedding_model(cfg.backbone, cfg.pooling, prompts_of(cfg), cache_root=str(work))
    model.to(device)
    if cfg.backbone.lora:
        wrap_lora(model, cfg)
    reset_peak(torch, device)
    sync(torch, device)
    t = time.perf_counter()
    summary = train_model(model, data.train_pairs, cfg, out_dir, info, device)
    sync(torch, device)
    elapsed = time.perf_counter() - t
    pairs_seen = summary["steps"] * cfg.train.per_device_train_batch_size
    return {"recipe": "align/recipes/esci_smollm2.yaml", "overrides": overrides,
            "backbone": "SmolLM2-135M architecture, random init" + (" (smoke: 2 layers)" if args.smoke else ""),
            "pooling": info["pooling"], "num_layers": cfg.backbone.num_layers, "lora": cfg.backbone.lora,
            "bf16": cfg.train.bf16, "hard_negatives": cfg.loss.use_hard_negatives, "max_seq_length": cfg.backbone.max_seq_length,
            "epochs": cfg.train.num_train_epochs, "train_pairs": len(data.train_pairs), "batch_size": cfg.train.per_device_train_batch_size,
            "steps": summary["steps"], "train_s": round(elapsed, 2),
            "step_s_mean": round(elapsed / max(1, summary["steps"]), 4),
            "pairs_per_s": round(pairs_seen / elapsed, 1), "train_loss": summary["train_loss"],
            "peak_memory_gib": peak_gib(torch, device), "leakage_check": data.notes.get("leakage", {}).get("ok")
            if isinstance(data.notes.get("leakage"), dict) else None, "patched": patched,
            "note": "train_s is the whole SentenceTransformerTrainer.train() (its setup included), one epoch"}
