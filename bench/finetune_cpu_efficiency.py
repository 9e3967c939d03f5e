"""Where SmolLM2 LoRA CPT spends its time on this CPU, its FLOP utilisation, and what makes it faster.

    .venv/bin/python bench/finetune_cpu_efficiency.py [--model smollm2] [--steps 24] [--max-length 256] [--batch 4]

`make demo`'s CPT setup (LoRA r=16 on every linear layer, isolated packing of the shipped ESCI + goodbooks
in-context documents, 4 rows x 256 positions per step), trained the same steps on the same batches in
several arms, one model each, steps interleaved so machine load hits every arm alike:

- `fp32`: float32 weights and compute.
- `bf16_autocast`: float32 weights, bf16 autocast (AMX) - recforge's default before this benchmark.
- `bf16_autocast_chunked_ce`: + the chunked lm_head/cross-entropy (finetune/chunked_loss.py).
- `bf16_weights`: frozen base weights stored in bf16 (no per-step fp32->bf16 casts), LoRA weights float32
  (peft keeps adapters in float32), bf16 autocast.
- `bf16_weights_chunked_ce`: both.

Reported per arm: positions/s (packed rows are ~99.7 % real tokens), model FLOP/s and utilisation, and the
training loss over the steps against fp32's. FLOPs per step are counted by `torch.utils.flop_counter` on the
fp32 arm (matmuls + attention, forward and backward; the same useful work in every arm). The CPU's peak is
counted from `lscpu`/`/proc/cpuinfo` (cores x clock x FLOP/cycle: AVX-512 with 2 FMA units = 64 fp32
FLOP/cycle/core, AMX-BF16 = 1024 bf16 FLOP/cycle/core) and measured as the best large `torch.mm`.
Also: the share of a step spent in lm_head + cross-entropy (timed alone on the step's hidden states), and a
`torch.profiler` table of the default arm's step. Writes bench/results/finetune_cpu_efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_cpu_efficiency.json"
ARMS = {  # name: (base weight dtype, autocast, chunked loss)
    "fp32": ("float32", False, False),
    "bf16_autocast": ("float32", True, False),
    "bf16_autocast_chunked_ce": ("float32", True, True),
    "bf16_weights": ("bfloat16", True, False),
    "bf16_weights_chunked_ce": ("bfloat16", True, True),
}
DEFAULT_ARM = "bf16_autocast"


def cpu_peak() -> dict:
    """Theoretical peak from the CPU's flags and clock, per core count; the clock is what /proc/cpuinfo says."""
    flags, mhz = set(), None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("cpu MHz") and mhz is None:
            mhz = float(line.split(":", 1)[1])
    cores = os.cpu_count()
    ghz = (mhz or 0) / 1000
    fp32_per_cycle = 64 if "avx512f" in flags else 32  # 2 FMA units x 16 (8) lanes x 2 FLOP
    bf16_per_cycle = 1024 if "amx_bf16" in flags else (128 if "avx512_bf16" in flags else fp32_per_cycle)
    return {"cores": cores, "clock_ghz": round(ghz, 3), "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "fp32_flop_per_cycle_core": fp32_per_cycle, "bf16_flop_per_cycle_core": bf16_per_cycle,
            "fp32_peak_gflops": round(cores * ghz * fp32_per_cycle, 1),
            "bf16_peak_gflops": round(cores * ghz * bf16_per_cycle, 1)}


def measured_matmul_gflops(torch, dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * n**3 / best / 1e9, 1)


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.chunked_loss import chunked_causal_lm_loss
    from recforge.finetune.demo import esci_rows, goodbooks_rows
    from recforge.finetune.packing import PackedCollator, pack_segments, row_segments
    from recforge.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model_dir = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [d for r in esci_rows() + goodbooks_rows(None) for d in r["documents"]]
    segments = [s for d in docs for s in row_segments(tok, [d], "isolated", args.max_length)]
    rows = pack_segments(segments, args.max_length)
    random.Random(1).shuffle(rows)
    collate = PackedCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    batches = [collate([{"segments": r} for r in rows[i * args.batch:(i + 1) * args.batch]]) for i in range(args.steps + 1)]

    models, opts = {}, {}
    for arm in args.arms:
        dtype, _, _ = ARMS[arm]
        torch.manual_seed(0)  # the same LoRA init in every arm
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        m.config.use_cache = False
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
        m.train()
        models[arm] = m
        opts[arm] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=5e-4)

    def loss_of(arm, batch):
        _, autocast, chunked = ARMS[arm]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return chunked_causal_lm_loss(models[arm], batch) if chunked else models[arm](**batch).loss

    def step(arm, batch) -> tuple[float, float]:
        t = time.perf_counter()
        loss = loss_of(arm, batch)
        loss.backward()
        opts[arm].step()
        opts[arm].zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss)

    # model FLOPs of one step (forward + backward), counted once on the reference arm
    ref = "fp32" if "fp32" in models else args.arms[0]
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(ref, batches[0]).backward()
    models[ref].zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    for arm in args.arms:
        step(arm, batches[0])  # warm-up (also the same first update everywhere)
    stats = {arm: {"time": 0.0, "losses": []} for arm in args.arms}
    for i in range(1, args.steps + 1):
        for arm in args.arms:
            dt, loss = step(arm, batches[i])
            stats[arm]["time"] += dt
            stats[arm]["losses"].append(round(loss, 4))

    positions = args.steps * args.batch * args.max_length
    peak = cpu_peak()
    peak["fp32_measured_mm_gflops"] = measured_matmul_gflops(torch, torch.float32)
    peak["bf16_measured_mm_gflops"] = measured_matmul_gflops(torch, torch.bfloat16)
    tail = max(1, args.steps // 3)
    ref_tail = sum(stats[ref]["losses"][-tail:]) / tail
    result = {
        "what": "SmolLM2 LoRA CPT step on CPU: throughput, model FLOP utilisation, loss per arm (interleaved steps)",
        "model": f"{args.model} ({model_dir}), LoRA r=16 all-linear",
        "batch": {"rows": args.batch, "max_length": args.max_length, "positions_per_step": args.batch * args.max_length},
        "steps_each": args.steps, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before[0]},
        "cpu_peak": peak,
        "model_flops_per_step": flops_per_step,
        "arms": {},
    }
    for arm, s in stats.items():
        flops_s = flops_per_step * args.steps / s["time"]
        bf16 = ARMS[arm][1]
        tail_loss = sum(s["losses"][-tail:]) / tail
        result["arms"][arm] = {
            "positions_per_s": round(positions / s["time"], 1),
            "model_gflops_per_s": round(flops_s / 1e9, 1),
            "mfu_vs_theoretical_peak": round(flops_s / 1e9 / peak["bf16_peak_gflops" if bf16 else "fp32_peak_gflops"], 4),
            "mfu_vs_measured_mm": round(flops_s / 1e9 / peak["bf16_measured_mm_gflops" if bf16 else "fp32_measured_mm_gflops"], 4),
            f"loss_last_{tail}_steps_mean": round(tail_loss, 4),
            "loss_vs_fp32_pct": round(100 * (tail_loss - ref_tail) / ref_tail, 2),
            "losses": s["losses"],
        }
    base = result["arms"].get(DEFAULT_ARM, {}).get("positions_per_s")
    if base:
        result["speedup_vs_" + DEFAULT_ARM] = {a: round(v["positions_per_s"] / base, 3) for a, v in result["arms"].items()}
    result["load_average_1min"]["after_training"] = os.getloadavg()[0]
    result["lm_head_ce_share"] = lm_head_share(torch, models, batches[1], args.arms)
    result["profile_" + DEFAULT_ARM] = profile_table(torch, lambda: step(DEFAULT_ARM, batches[2])) if DEFAULT_ARM in models else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=2))
    print("\n".join(result.get("profile_" + DEFAULT_ARM) or []))
    return 0


def lm_head_share(torch, models, batch, arms) -> dict:
    """Seconds of lm_head + cross-entropy forward+backward alone, on one step's hidden states, stock vs chunked."""
    from recforge.finetune.chunked_loss import causal_lm_parts, linear_cross_entropy

    out = {}
    for arm in arms:
        _, autocast, chunked = ARMS[arm]
        decoder, head = causal_lm_parts(models[arm])
        weight = head.weight
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        h = hidden[:, :-1][keep].detach().requires_grad_(True)
        t = labels[keep]
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if chunked:
                    loss = linear_cross_entropy(h, weight, t)
                else:
                    loss = torch.nn.functional.cross_entropy((h @ weight.T).float(), t)
            loss.backward()
            best = min(best, time.perf_counter() - start)
            h.grad = None
        out[arm] = round(best, 3)
    return {"what": "seconds per step in lm_head + cross-entropy (forward + backward, best of 3)", "seconds": out}


def profile_table(torch, run_step, rows: int = 18) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows).splitlines()


if __name__ == "__main__":
    sys.exit(main())
