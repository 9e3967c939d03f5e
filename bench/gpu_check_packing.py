"""bench/gpu_check.py's `packing` part: bench/finetune_packing.py's arms (its own batch builders, imported) with the
timed loop on the GPU: real tokens/s per arm, and each arm's loss against its documents run one at a time
(the isolation check, on the GPU).
"""

from __future__ import annotations

import argparse
import random
import time
import traceback
from pathlib import Path

from gpu_check_common import (Clock, corpus_segments, ensure_recforge, load_bench_module, peak_gib, random_model,
                              reset_peak, sync, to_device)


def part_packing(args, clock: Clock) -> dict:
    """bench/finetune_packing.py's arms with the timed loop on `device` (that script's loop is CPU-bound: autocast
    'cpu', CPU tensors). Batches come from its own `build_batches`, so the arms are the same layouts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_recforge()
    fp = load_bench_module("finetune_packing")
    device = args.device
    amp = "cuda" if device.startswith("cuda") else "cpu"
    work = Path(args.work)
    model_dir = random_model("smollm2", work, args.smoke)
    bargs = argparse.Namespace(max_length=64 if args.smoke else 512, rows_per_batch=2 if args.smoke else 4,
                               docs_per_micro=4 if args.smoke else 16, bf16=True)
    steps = args.steps if args.smoke else max(args.steps, 20)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    segments = corpus_segments(tok, bargs.max_length)
    random.Random(0).shuffle(segments)
    if args.smoke:
        segments = segments[:200]
    lengths = sorted(len(s) for s in segments)
    docs_per_batch = max(1, round(bargs.rows_per_batch * bargs.max_length * 0.99 / (sum(lengths) / len(lengths))))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).to(device)
    out = {"model": "SmolLM2-135M architecture, random init, LoRA r=16 all-linear, float32 weights + bf16 autocast"
                    + (" (smoke: 2 layers)" if args.smoke else ""),
           "max_length": bargs.max_length, "rows_per_batch": bargs.rows_per_batch,
           "docs_per_micro_batch_padded": bargs.docs_per_micro, "docs_per_batch_unpacked": docs_per_batch,
           "corpus": {"documents": len(segments), "tokens": sum(lengths)}, "arms": {}}
    arms, batches, isolation = [], {}, {}
    for arm in fp.ARMS:
        try:
            batches[arm] = fp.build_batches(arm, segments, tok, bargs, docs_per_batch)
            isolation[arm] = isolation_gap(torch, model, fp, arm, segments[:4 if args.smoke else 24], tok, bargs, device, amp)
            arms.append(arm)
        except Exception as err:
            out["arms"][arm] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc()[-1500:]}
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step(micro):
        dev = [(to_device(b, device), real) for b, real in micro]
        sync(torch, device)
        t = time.perf_counter()
        for b, _ in dev:
            with torch.autocast(amp, dtype=torch.bfloat16):
                loss = model(**b).loss
            (loss / len(dev)).backward()
        sync(torch, device)
        fb = time.perf_counter() - t
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(torch, device)
        return fb, time.perf_counter() - t - fb

    for arm in list(arms):  # warm-up, one step each
        try:
            step(batches[arm][0])
        except Exception as err:
            arms.remove(arm)
            out["arms"][arm] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc()[-1500:]}
    reset_peak(torch, device)
    stats = {a: {"time": 0.0, "opt": 0.0, "real": 0, "positions": 0, "steps": 0} for a in arms}
    for i in range(1, steps + 1):  # interleaved, as in the CPU bench
        if clock.left() < 10:
            break
        for arm in arms:
            micro = batches[arm][(i * len(batches[arm])) // (steps + 1)]
            fb, opt_s = step(micro)
            s = stats[arm]
            s["time"] += fb
            s["opt"] += opt_s
            s["real"] += sum(r for _, r in micro)
            s["positions"] += sum(b["input_ids"].numel() for b, _ in micro)
            s["steps"] += 1
    for arm in arms:
        s = stats[arm]
        out["arms"][arm] = {"steps_timed": s["steps"],
                            "real_tokens_per_s": round(s["real"] / s["time"], 1) if s["time"] else None,
                            "real_tokens_per_s_with_optimizer": round(s["real"] / (s["time"] + s["opt"]), 1) if s["time"] else None,
                            "real_token_fraction": round(s["real"] / s["positions"], 4) if s["positions"] else None,
                            "max_abs_loss_diff_vs_alone": round(isolation[arm], 5)}
    out["peak_memory_gib_all_arms"] = peak_gib(torch, device)
    ours = out["arms"].get("recforge_isolated", {}).get("real_tokens_per_s")
    peers = {a: v["real_tokens_per_s"] for a, v in out["arms"].items()
             if a not in ("recforge_isolated", "random_padded") and v.get("real_tokens_per_s")}
    if ours and peers:
        best = max(peers, key=peers.get)
        out["best_peer"] = best
        out["ratio_vs_best_peer"] = round(ours / peers[best], 3)
    return out


def isolation_gap(torch, model, fp, arm, segments, tok, bargs, device, amp) -> float:
    """bench/finetune_packing.py's `loss_vs_alone` on `device`: |loss of the arm's layout - documents one at a time|."""
    docs = segments
    model.eval()
    with torch.no_grad(), torch.autocast(amp, dtype=torch.bfloat16):
        alone = []
        for d in docs:
            ids = torch.tensor([d], device=device)
            alone.append(float(model(input_ids=ids, labels=ids).loss) * (len(d) - 1))
        want = sum(alone) / sum(len(d) - 1 for d in docs)
        one = argparse.Namespace(**{**vars(bargs), "rows_per_batch": 10**6})
        total, n = 0.0, 0
        for micro in fp.build_batches(arm, docs, tok, one, docs_per_batch=len(docs)):
            for batch, _ in micro:
                batch = to_device(batch, device)
                k = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * k
                n += k
    return abs(total / n - want)
