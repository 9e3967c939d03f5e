"""bench/gpu_check.py's `cpt:<model>` parts: CPT LoRA on a random-init SmolLM2-135M / Qwen2.5-0.5B, bf16, the shipped
corpus packed by `finetune.packing`: a plain loop (stock loss vs `finetune.chunked_loss`) with tokens/s, peak memory
and MFU from `torch.utils.flop_counter`, then the project's own CPT path (`finetune.cpt.make_trainer` on
finetune/recipes/cpt_esci_gpu.yaml) timed by a callback. What each number means: bench/gpu_check.py's docstring.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import traceback
from pathlib import Path

from gpu_check_common import (GPU_MODELS, ROOT, Clock, corpus_segments, ensure_recforge, peak_gib, peak_tflops,
                              random_model, reset_peak, sync, to_device)


def cpt_shapes(args):
    """max_length and rows per micro-batch: the GPU recipe's (2048 x 8) unless overridden / smoke."""
    from recforge.config import load_recipe
    from recforge.finetune.cpt_config import CPTConfig

    recipe = load_recipe(CPTConfig, ROOT / "finetune/recipes/cpt_esci_gpu.yaml")
    max_length = args.max_length or (32 if args.smoke else recipe.max_length)
    batch = args.batch or (1 if args.smoke else recipe.training.per_device_train_batch_size)
    return recipe, max_length, batch


def part_cpt(args, clock: Clock, name: str) -> dict:
    import torch

    ensure_recforge()
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.chunked_loss import chunked_causal_lm_loss
    from recforge.finetune.packing import PackedCollator, pack_segments

    device = args.device
    work = Path(args.work)
    t0 = time.time()
    model_dir = random_model(name, work, args.smoke)
    recipe, max_length, rows = cpt_shapes(args)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packed = pack_segments(corpus_segments(tok, max_length), max_length)
    random.Random(1).shuffle(packed)
    collate = PackedCollator(pad)
    warmup = 1 if args.smoke else 2
    # distinct batches (the corpus holds ~100 packed rows of 2048): steps cycle over them
    n_batches = max(1, min(len(packed) // rows, warmup + args.steps))
    batches = [collate([{"segments": r} for r in packed[i * rows:(i + 1) * rows]]) for i in range(n_batches)]
    real = [sum(len(s) for r in packed[i * rows:(i + 1) * rows] for s in r) for i in range(n_batches)]
    n_params = None
    out = {"model": f"{name}: {json.loads((GPU_MODELS / name / 'recforge_source.json').read_text())['upstream']} "
                    "architecture, random init" + (" (smoke: 2 layers)" if args.smoke else ""),
           "lora": "r=16 alpha=32 all-linear", "max_length": max_length, "rows_per_step": rows,
           "positions_per_step": int(batches[0]["input_ids"].numel()), "packed_rows_in_corpus": len(packed),
           "distinct_batches": n_batches,
           "setup_s": None, "arms": {}}
    peak = peak_tflops(torch, device, args.peak_tflops)["bf16_peak_tflops"]
    out["bf16_peak_tflops_used"] = peak
    amp = "cuda" if device.startswith("cuda") else "cpu"

    def build(dtype):
        nonlocal n_params
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        n_params = sum(p.numel() for p in m.parameters())
        m.config.use_cache = False
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
        m.to(device).train()
        return m

    def loss_of(m, batch, chunked):
        with torch.autocast(amp, dtype=torch.bfloat16):
            return chunked_causal_lm_loss(m, batch) if chunked else m(**batch).loss

    dev_batches = [to_device(b, device) for b in batches]
    out["setup_s"] = round(time.time() - t0, 1)
    flops_per_step = None
    for arm, chunked in (("loop_stock", False), ("loop_chunked_ce", True)):
        if clock.left() < 25:
            out["arms"][arm] = {"status": "skipped: part time budget"}
            continue
        try:
            reset_peak(torch, device)
            m = build(torch.bfloat16)
            opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-4)
            if flops_per_step is None:  # counted once, on the stock path (the same useful work in both arms)
                counter = FlopCounterMode(display=False)
                with counter:
                    loss_of(m, dev_batches[0], False).backward()
                m.zero_grad(set_to_none=True)
                flops_per_step = counter.get_total_flops()
                out["model_flops_per_step"] = flops_per_step
                out["model_flops_per_position"] = round(flops_per_step / out["positions_per_step"], 1)
                out["flops_note"] = ("torch.utils.flop_counter on one stock forward+backward (bench/finetune_cpu_efficiency.py's "
                                     "accounting): matmuls incl. the frozen layers' input gradients, and sdpa as executed "
                                     "(the full square under the packed block-diagonal mask)")
            times, losses, done_real, done_pos = [], [], 0, 0
            for i in range(warmup + args.steps):
                b = dev_batches[i % n_batches]
                if i >= warmup and clock.left() < 12:
                    break
                sync(torch, device)
                t = time.perf_counter()
                loss = loss_of(m, b, chunked)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(torch, device)
                dt = time.perf_counter() - t
                if i >= warmup:
                    times.append(dt)
                    losses.append(round(float(loss.detach()), 4))
                    done_real += real[i % n_batches]
                    done_pos += b["input_ids"].numel()
            total = sum(times)
            res = {"steps_timed": len(times), "warmup_steps": warmup,
                   "step_s_mean": round(total / len(times), 4) if times else None,
                   "step_s_min": round(min(times), 4) if times else None,
                   "real_tokens_per_s": round(done_real / total, 1) if total else None,
                   "positions_per_s": round(done_pos / total, 1) if total else None,
                   "peak_memory_gib": peak_gib(torch, device), "losses": losses}
            if total and flops_per_step:
                tflops = flops_per_step * len(times) / total / 1e12
                res["model_tflops_per_s"] = round(tflops, 2)
                res["mfu"] = round(tflops / peak, 4) if peak else None
            out["arms"][arm] = res
            del m, opt
        except Exception as err:
            out["arms"][arm] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc()[-2000:]}
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    out["parameters"] = n_params
    if clock.left() < 30:
        out["arms"]["trainer"] = {"status": "skipped: part time budget"}
    else:
        try:
            out["arms"]["trainer"] = cpt_trainer_arm(args, clock, name, model_dir, max_length, rows, flops_per_step,
                                                     out["positions_per_step"], peak)
        except Exception as err:
            out["arms"]["trainer"] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()[-3000:]}
    return out


def cpt_trainer_arm(args, clock: Clock, name: str, model_dir: Path, max_length: int, rows: int,
                    flops_per_step, positions_per_step, peak) -> dict:
    """The project's CPT path: finetune.cpt.make_trainer on the GPU recipe, a few steps of Trainer.train()."""
    import torch
    from transformers import TrainerCallback, set_seed

    from recforge.config import load_recipe
    from recforge.finetune.cpt import make_trainer
    from recforge.finetune.cpt_config import CPTConfig
    from recforge.finetune.demo import write_sample_corpora

    device = args.device
    work = Path(args.work)
    corpora = work / "corpus"
    if not (corpora / "esci.parquet").is_file():
        write_sample_corpora(corpora)
    out_dir = work / f"cpt_{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = max(2, min(args.trainer_steps, args.steps + 1)) if args.smoke else args.trainer_steps
    overrides = [f"model.path={model_dir}", f"data.train.esci.path={corpora / 'esci.parquet'}",
                 "data.eval.esci=null", "data.eval.goodbooks=null", f"out_dir={out_dir}",
                 f"max_length={max_length}", f"training.per_device_train_batch_size={rows}",
                 f"training.max_steps={steps}", "training.logging_steps=1", "training.save_steps=100000"]
    if args.smoke:
        overrides.append("training.gradient_accumulation_steps=1")
    cfg = load_recipe(CPTConfig, ROOT / "finetune/recipes/cpt_esci_gpu.yaml", overrides)
    set_seed(cfg.seed)
    reset_peak(torch, device)
    trainer = make_trainer(cfg, out_dir, run=None, allow_partial=True)  # the sample corpora have no producing run

    counts = []  # (real tokens, positions) of every collated micro-batch

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            real = sum(len(seg) for f in features for seg in f["segments"]) if "segments" in features[0] else \
                sum(len(f["input_ids"]) for f in features)
            counts.append((real, int(batch["input_ids"].numel())))
            return batch

    trainer.data_collator = Counting(trainer.data_collator)
    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(torch, device)
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync(torch, device)
            step_times.append(time.perf_counter() - self.t)
            if clock.left() < 10:
                control.should_training_stop = True

    trainer.add_callback(Timer())
    result = trainer.train()
    accum = cfg.training.gradient_accumulation_steps
    warm = 1 if len(step_times) > 2 else 0
    timed = step_times[warm:]
    mean_real = sum(c[0] for c in counts) / len(counts)
    mean_pos = sum(c[1] for c in counts) / len(counts)
    res = {"recipe": "finetune/recipes/cpt_esci_gpu.yaml", "overrides": overrides,
           "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
           "gradient_checkpointing": cfg.model.gradient_checkpointing, "bf16": cfg.training.bf16,
           "gradient_accumulation_steps": accum, "steps": trainer.state.global_step, "steps_timed": len(timed),
           "step_s_mean": round(sum(timed) / len(timed), 4) if timed else None,
           "real_tokens_per_s": round(mean_real * accum * len(timed) / sum(timed), 1) if timed else None,
           "positions_per_s": round(mean_pos * accum * len(timed) / sum(timed), 1) if timed else None,
           "train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
           # the whole train() (first step, collation, logging included): what a user's run gets
           "real_tokens_per_s_whole_run": round(sum(c[0] for c in counts) / result.metrics["train_runtime"], 1)
           if result.metrics.get("train_runtime") else None,
           "peak_memory_gib": peak_gib(torch, device),
           "note": "step_s/tokens/s: callback-timed optimizer steps after the first (the window's batches are collated "
                   "before on_step_begin, so collation is outside), tokens from the mean collated micro-batch x accumulation; MFU from the loop's model FLOPs per "
                   "position (same model, packer and shapes; checkpointing's recomputation not counted)"}
    if timed and flops_per_step and positions_per_step:
        tflops = flops_per_step / positions_per_step * mean_pos * accum * len(timed) / sum(timed) / 1e12
        res["model_tflops_per_s"] = round(tflops, 2)
        res["mfu"] = round(tflops / peak, 4) if peak else None
    return res
