"""Peak training memory, LoRA vs full fine-tuning, same model and batch.

Each mode runs in its own subprocess: load the model, build one packed batch, then take a few
AdamW steps. On CUDA the number is `torch.cuda.max_memory_allocated`; on CPU it is the peak
resident-memory growth over the training steps (sampled every 2 ms), i.e. what training adds on
top of the loaded weights (gradients, optimizer state, activations). Writes bench/results/finetune_memory.json.

    .venv/bin/python bench/finetune_memory.py [--hidden-size 1024 --num-layers 8 --batch-rows 2 --max-length 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from peak_memory import reset_hwm, status_bytes  # bench/peak_memory.py (scripts run from bench/)

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_memory.json"


def child(model_dir: str, mode: str, batch_rows: int, max_length: int) -> dict:
    import threading
    import time

    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recforge.finetune.demo import esci_rows
    from recforge.finetune.packing import PackedCollator, pack_segments, row_segments

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda" if cuda else "cpu")
    model.config.use_cache = False
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    segs = [s for r in esci_rows() for s in row_segments(tok, r["documents"], "isolated", max_length)]
    rows = pack_segments(segs, max_length)[:batch_rows]
    batch = {k: v.to(model.device) for k, v in PackedCollator(tok.pad_token_id)([{"segments": r} for r in rows]).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    # the kernel's high-water mark (VmHWM) sees short peaks the sampler misses; reset it to "now" first
    hwm = reset_hwm()
    th = threading.Thread(target=sample, daemon=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    th.start()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    done.set()
    th.join()
    out = {"mode": mode, "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in model.parameters()),
           "batch_tokens": int(batch["input_ids"].numel())}
    out["grad_and_adam_state_bytes"] = out["trainable_params"] * 4 * 3  # fp32 grad + 2 Adam moments
    if cuda:
        out["peak_training_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
        out["measure"] = "cuda max_memory_allocated over the steps"
    elif hwm:
        out["peak_training_bytes"] = max(status_bytes("VmHWM"), peak[0]) - base
        out["measure"] = "cpu peak RSS (VmHWM, reset before the steps) growth over the steps"
    else:
        out["peak_training_bytes"] = peak[0] - base
        out["measure"] = "cpu peak RSS growth over the steps (sampled every 2 ms)"
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--batch-rows", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--model", default=None)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch_rows, args.max_length)))
        return 0
    model_dir = args.model
    if model_dir is None:
        from recforge.tiny_model import TinyModelConfig, build_tiny_model

        model_dir = str(build_tiny_model(TinyModelConfig(hidden_size=args.hidden_size, num_layers=args.num_layers),
                                         Path(tempfile.mkdtemp()) / "model"))
    runs = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", model_dir, mode, "--batch-rows", str(args.batch_rows),
                              "--max-length", str(args.max_length)], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "what": "peak memory added by training (3 AdamW steps), LoRA r=16 all-linear vs full, same model and batch",
        "model": {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "path": model_dir},
        **runs,
        "full_over_lora": runs["full"]["peak_training_bytes"] / max(runs["lora"]["peak_training_bytes"], 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
