"""Packed (isolated) vs padded training batches on the shipped corpus' real length distribution.

Same model, same documents, same optimizer; steps of the two modes are interleaved in one process so
machine load affects both alike. Reports real (non-pad) tokens per second for each and their ratio,
and the real-token fraction of each mode's batches. Tokens/s count forward+backward time (what the
batch layout changes); the optimizer step, the same per step in both modes, is reported beside it. Writes bench/results/finetune_packing.json.

    .venv/bin/python bench/finetune_packing.py [--steps 12] [--max-length 512] [--rows-per-batch 8]

Padded baseline: documents in random order, `--docs-per-batch` per batch, padded to the longest in
the batch (the common `DataCollatorWithPadding` setup); each batch holds about as many real tokens
as a packed batch (the same effective batch size), so the padding is the only difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_packing.json"


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.demo import esci_rows, goodbooks_rows
    from recforge.finetune.packing import PackedCollator, PaddedCollator, pack_segments, row_segments
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows-per-batch", type=int, default=8)
    p.add_argument("--docs-per-batch", type=int, default=None, help="default: matched to the packed positions")
    p.add_argument("--model", default=None, help="a model folder (default: build the tiny model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    torch.manual_seed(0)
    model_dir = args.model or build_tiny_model(TinyModelConfig(), Path(tempfile.mkdtemp()) / "tiny")
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [d for r in esci_rows() + goodbooks_rows(None) for d in r["documents"]]
    segments = [s for d in docs for s in row_segments(tok, [d], "isolated", args.max_length)]
    random.Random(0).shuffle(segments)
    lengths = sorted(len(s) for s in segments)

    packed_rows = pack_segments(segments, args.max_length)
    random.Random(1).shuffle(packed_rows)
    packed_positions = args.rows_per_batch * args.max_length
    # same real tokens per optimizer step as a packed batch (same effective batch size for training)
    docs_per_batch = args.docs_per_batch or max(1, round(packed_positions / (sum(lengths) / len(lengths))))
    pack_c, pad_c = PackedCollator(tok.pad_token_id), PaddedCollator(tok.pad_token_id)
    packed_batches = [pack_c([{"segments": r} for r in packed_rows[i:i + args.rows_per_batch]])
                      for i in range(0, len(packed_rows), args.rows_per_batch)]
    padded_batches = [pad_c([{"input_ids": s} for s in segments[i:i + docs_per_batch]])
                      for i in range(0, len(segments), docs_per_batch)]

    def real_tokens(b) -> int:
        if "attention_mask" in b:
            return int(b["attention_mask"].sum())
        return 0

    packed_real = [sum(len(s) for s in packed_rows[i]) for i in range(len(packed_rows))]
    packed_real_per_batch = [sum(packed_real[i:i + args.rows_per_batch]) for i in range(0, len(packed_rows), args.rows_per_batch)]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> tuple[float, float]:
        """(forward+backward seconds, optimizer seconds): only the first depends on how the batch is built."""
        t = time.perf_counter()
        model(**batch).loss.backward()
        t_fb = time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t_fb, time.perf_counter() - t

    step(packed_batches[0]); step(padded_batches[0])  # warm-up
    stats = {m: {"time": 0.0, "opt_time": 0.0, "real": 0, "positions": 0} for m in ("packed", "padded")}

    def record(mode, batch, real):
        fb, opt_s = step(batch)
        stats[mode]["time"] += fb
        stats[mode]["opt_time"] += opt_s
        stats[mode]["real"] += real
        stats[mode]["positions"] += batch["input_ids"].numel()

    for i in range(1, args.steps + 1):  # interleaved so load changes hit both modes alike
        record("packed", packed_batches[i % len(packed_batches)], packed_real_per_batch[i % len(packed_batches)])
        db = padded_batches[i % len(padded_batches)]
        record("padded", db, real_tokens(db))

    all_packed_fill = sum(packed_real) / (len(packed_rows) * args.max_length)
    result = {
        "what": "real (non-pad) training tokens/s, isolated packing vs padding to the longest in batch, interleaved steps",
        "model": str(model_dir),
        "corpus": {"documents": len(segments), "tokens": sum(lengths), "length_p50": lengths[len(lengths) // 2],
                   "length_p90": lengths[int(len(lengths) * 0.9)], "length_max": lengths[-1]},
        "max_length": args.max_length,
        "rows_per_batch": args.rows_per_batch,
        "docs_per_batch_padded": docs_per_batch,
        "steps_each": args.steps,
        "torch_threads": torch.get_num_threads(),
        # other processes on the machine skew both modes; the interleaving evens it out only partly
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    for mode, s in stats.items():
        result[mode] = {"real_tokens_per_s": s["real"] / s["time"],
                        "real_tokens_per_s_with_optimizer": s["real"] / (s["time"] + s["opt_time"]),
                        "real_token_fraction": s["real"] / s["positions"],
                        "forward_backward_seconds": s["time"], "optimizer_seconds": s["opt_time"], "real_tokens": s["real"]}
    result["packed"]["real_token_fraction_all_rows"] = all_packed_fill
    # primary: forward+backward, the part packing changes; the AdamW step costs the same per step in both modes
    result["speedup_real_tokens_per_s"] = result["packed"]["real_tokens_per_s"] / result["padded"]["real_tokens_per_s"]
    result["speedup_with_optimizer_step"] = (result["packed"]["real_tokens_per_s_with_optimizer"]
                                             / result["padded"]["real_tokens_per_s_with_optimizer"])
    result["targets"] = {"speedup_ge_2.5": result["speedup_real_tokens_per_s"] >= 2.5,
                         "packed_real_fraction_ge_0.98": all_packed_fill >= 0.98}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
