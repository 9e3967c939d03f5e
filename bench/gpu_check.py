"""GPU check of recforge's training paths (issue 27, item 5): CPT LoRA throughput/MFU, one align epoch, packing bench.

How to run it (the device tool of this workplace; one H100, <= 8 minutes of the session's 15):

    bash bench/gpu_prepare.sh            # here, once: the missing wheels (pydantic, datasets, trl...) into .whl/
    run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
    # the reply's files: gpu_check.json + gpu_check.log (copy gpu_check.json to bench/results/ and commit it)

Anywhere else with a CUDA GPU and recforge installed: `bash bench/gpu_check.sh` (JSON to $OUT, else bench/results/).
The CPU smoke run (proves the code path; a 2-layer cut of each config, tiny shapes, no numbers worth keeping):

    .venv/bin/python bench/gpu_check.py --device cpu --smoke --steps 2 --threads 1 --out /tmp/gpu_check_smoke

What it measures (each part in its own process, time-boxed; a part that fails or runs out of time is recorded
in the JSON as such, and the others still run):

- `env`: GPU name, torch / CUDA / package versions, the bf16 peak used for MFU (H100 SXM and H200: 989.4 TFLOP/s
  dense; `--peak-tflops` overrides) and the measured best 8192^3 bf16 `torch.mm`.
- `cpt:smollm2`, `cpt:qwen2.5-0.5b`: SmolLM2-135M and Qwen2.5(-Coder)-0.5B **with random weights** built from the
  configs in .whl/gpu_models/ (copied there by bench/gpu_prepare.sh; weights cannot travel to the GPU machine; throughput and FLOPs do not depend on
  their values). LoRA r=16 on every linear layer, bf16 weights, the shipped ESCI + goodbooks documents packed by
  `finetune.packing` (isolated, the GPU recipe's max_length x per_device_train_batch_size: 2048 x 8):
    * `loop_stock` / `loop_chunked_ce`: forward + backward + AdamW step in a plain loop, stock loss vs
      `finetune.chunked_loss` (what bench/finetune_cpu_efficiency.py measures on the CPU: model FLOPs per step from
      `torch.utils.flop_counter` on the stock arm, the same accounting), tokens/s, step time, peak GPU memory, MFU;
    * `trainer`: the project's own CPT path, `finetune.cpt.make_trainer` on finetune/recipes/cpt_esci_gpu.yaml
      (transformers Trainer, bf16, gradient checkpointing, flash-attention falling back to sdpa where flash-attn
      is missing), `max_steps` steps timed by a callback; MFU from the loop's FLOPs per position (model FLOPs:
      checkpointing's recomputation is not counted).
- `align`: one epoch of `align.trainer.train_model` (SentenceTransformerTrainer) on the shipped ESCI pairs with
  `make demo`'s align/recipes/esci_smollm2.yaml as it stands (its pooling, layers, LoRA or full fine-tuning are
  recorded), `train.num_train_epochs=1` and bf16 on the GPU, on the **random-init SmolLM2** backbone
  (all-MiniLM-L6-v2's weights cannot travel either); pairs/s, step time, peak memory. The image has no polars
  (54 MB wheel, too big to carry), which the data path uses only for the train/eval id-overlap report
  (`recforge.splits.leakage_check`): there it is computed with Python sets instead, and the JSON says so.
- `packing`: bench/finetune_packing.py's arms (its own batch builders, imported) with the timed loop on the GPU:
  real tokens/s per arm and each arm's loss against the documents run alone (isolation check, on the GPU).

Checking it without a GPU as the GPU image would run it (its package versions in a --target folder on
PYTHONPATH, the carried wheels built for this Python, the packages it lacks blocked, recforge imported from the
checkout rather than the installed copy):

    PYVER=3.11 DEST=/tmp/whl311 bash bench/gpu_prepare.sh
    pip install --no-deps --target /tmp/gpuimg transformers==5.17.0 sentence-transformers==6.0.1 \
      accelerate==1.15.0 huggingface_hub==1.33.0          # the image's versions (KINDS.md)
    PYTHON=.venv/bin/python GPU_CHECK_WHEELS=/tmp/whl311 GPU_CHECK_SITE=/tmp/site311 PYTHONPATH=/tmp/gpuimg \
      GPU_CHECK_SHIM=1 GPU_CHECK_BLOCK=polars,gguf,xgrammar,faiss,jsonschema,evaluate,bitsandbytes,vllm,ray \
      GPU_CHECK_TIMEOUT_S=3000 OUT=/tmp/smoke bash bench/gpu_check.sh --device cpu --smoke --steps 1 --threads 1

The files: this one is the driver (arguments, one worker process per part under the time budget, the JSON and
the log); each part is its own module beside it, imported by its bare name (bench/ is not a package, and the GPU
machine has only the working tree): gpu_check_common.py (import plumbing, device helpers, random-init models, the
corpus, the `env` part), gpu_check_cpt.py (`cpt:*`), gpu_check_align.py (`align`), gpu_check_packing.py (`packing`).

Output: gpu_check.json (one key per part: its numbers, or {"status": "failed"|"timeout", "error": ...}) and
gpu_check.log (each part's stderr tail) in --out ($OUT, else bench/results/). Without CUDA and without
`--device cpu` it prints a line and exits 0 (so `make bench`'s loop over bench/*.py does not run it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the part modules beside this script
from gpu_check_common import BENCH, PART_CAPS, Clock, block_modules  # noqa: E402


# ---------------------------------------------------------------------------- orchestration


def run_worker(args) -> int:
    if os.environ.get("GPU_CHECK_BLOCK"):
        block_modules(os.environ["GPU_CHECK_BLOCK"])
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock(args.deadline)
    part = args.worker
    started = time.time()
    try:
        if part == "env":
            from gpu_check_common import part_env

            res = part_env(args, clock)
        elif part.startswith("cpt:"):
            from gpu_check_cpt import part_cpt

            res = part_cpt(args, clock, part.split(":", 1)[1])
        elif part == "align":
            from gpu_check_align import part_align

            res = part_align(args, clock)
        elif part == "packing":
            from gpu_check_packing import part_packing

            res = part_packing(args, clock)
        else:
            raise ValueError(f"unknown part {part}")
        res = {"status": "ok", **res}
    except Exception as err:
        res = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    res["part_s"] = round(time.time() - started, 1)
    Path(args.result).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (smoke run)")
    p.add_argument("--smoke", action="store_true", help="2-layer models, tiny shapes: proves the code path on a CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per CPT loop arm and packing arm")
    p.add_argument("--trainer-steps", type=int, default=10, help="Trainer steps (each = the recipe's accumulation)")
    p.add_argument("--max-length", type=int, default=None, help="CPT rows (default: the GPU recipe's, 2048)")
    p.add_argument("--batch", type=int, default=None, help="CPT rows per step (default: the GPU recipe's, 8)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("GPU_CHECK_THREADS", 4)))
    p.add_argument("--parts", default=",".join(PART_CAPS), help="comma list of " + ", ".join(PART_CAPS))
    p.add_argument("--budget-s", type=float, default=430, help="the whole run, all parts (the .sh adds the install)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by GPU name)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCH / "results")
    p.add_argument("--work", default=None, help="scratch folder (random-init models, corpora, trainer outputs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)

    start = time.time()
    if args.device is None:
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if not has_cuda:
            print("gpu_check: no CUDA device here; nothing run (use --device cpu --smoke for the CPU smoke run)")
            return 0
        args.device = "cuda"
    work = Path(args.work or f"/tmp/gpu_check_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_cpu_smoke" if args.device == "cpu" else "gpu_check"
    out_json, out_log = args.out / f"{name}.json", args.out / f"{name}.log"
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    result = {"what": "recforge on one GPU: CPT LoRA steps (SmolLM2-135M, Qwen2.5-0.5B; random init, bf16) with "
                      "tokens/s and MFU, one align epoch, the packing bench (bench/gpu_check.py)",
              "device": args.device, "smoke": args.smoke, "budget_s": args.budget_s,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "parts": {}}
    log = open(out_log, "w")

    class Killed(Exception):
        pass

    def on_term(signum, frame):
        raise Killed()

    import signal

    signal.signal(signal.SIGTERM, on_term)  # subprocess.run kills the worker on the way out
    for i, part in enumerate(parts):
        left = args.budget_s - (time.time() - start)
        later = sum(min(PART_CAPS.get(q, 60), 30) for q in parts[i + 1:])  # keep a little for each later part
        cap = PART_CAPS.get(part, 60) * (10 if args.device == "cpu" else 1)
        limit = min(cap, left - later) if args.device != "cpu" else cap
        if limit < 15:
            result["parts"][part] = {"status": "skipped", "reason": f"whole-run budget ({args.budget_s:.0f} s) spent"}
            continue
        res_file = work / f"{part.replace(':', '_')}.json"
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--deadline", str(time.time() + limit),
               "--result", str(res_file), "--device", args.device, "--steps", str(args.steps),
               "--trainer-steps", str(args.trainer_steps), "--threads", str(args.threads), "--work", str(work)]
        for flag, value in (("--max-length", args.max_length), ("--batch", args.batch), ("--peak-tflops", args.peak_tflops)):
            if value:
                cmd += [flag, str(value)]
        if args.smoke:
            cmd.append("--smoke")
        print(f"== {part} (limit {limit:.0f} s)", flush=True)
        log.write(f"== {part} (limit {limit:.0f} s)\n")
        log.flush()
        t = time.time()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit + 15,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
            text, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as err:
            text, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
        except Killed:
            result["parts"][part] = {"status": "killed", "reason": "SIGTERM (the wrapper's timeout)",
                                     "wall_s": round(time.time() - t, 1)}
            result["total_s"] = round(time.time() - start, 1)
            out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"killed during {part}; wrote {out_json}", flush=True)
            return 1
        log.write(text[-20000:] + "\n")
        log.flush()
        if res_file.is_file():
            res = json.loads(res_file.read_text())
        else:
            res = {"status": "timeout" if rc == "timeout" else "failed", "returncode": rc, "wall_s": round(time.time() - t, 1),
                   "output_tail": text[-3000:]}
        result["parts"][part] = res
        print(json.dumps(summary_line(part, res)), flush=True)
        out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")  # partial results survive a kill
    add_measured_mfu(result)
    result["total_s"] = round(time.time() - start, 1)
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_json} ({result['total_s']} s)")
    return 0


def add_measured_mfu(result: dict) -> None:
    """Each CPT arm's utilisation also against the env part's measured best bf16 matmul (the practical ceiling)."""
    peak = result["parts"].get("env", {}).get("peak", {})
    measured = next((v for k, v in peak.items() if k.startswith("measured_bf16_mm")), None)
    if not measured:
        return
    for part, res in result["parts"].items():
        for arm in (res.get("arms") or {}).values() if part.startswith("cpt:") else ():
            if arm.get("model_tflops_per_s"):
                arm["mfu_vs_measured_mm"] = round(arm["model_tflops_per_s"] / measured, 4)


def summary_line(part: str, res: dict) -> dict:
    """The few numbers of a part, for the console."""
    s = {"part": part, "status": res.get("status"), "s": res.get("part_s", res.get("wall_s"))}
    if res.get("status") != "ok":
        s["error"] = (res.get("error") or res.get("output_tail", ""))[-300:]
        return s
    if part == "env":
        s.update(gpu=res.get("gpu"), peak=res.get("peak"))
    elif part.startswith("cpt:"):
        s["arms"] = {a: {k: v.get(k) for k in ("status", "real_tokens_per_s", "step_s_mean", "mfu", "peak_memory_gib", "error")
                         if v.get(k) is not None} for a, v in res["arms"].items()}
    elif part == "align":
        s.update({k: res.get(k) for k in ("steps", "train_s", "pairs_per_s", "peak_memory_gib")})
    elif part == "packing":
        s["arms"] = {a: v.get("real_tokens_per_s", v.get("error")) for a, v in res["arms"].items()}
        s["ratio_vs_best_peer"] = res.get("ratio_vs_best_peer")
    return s


if __name__ == "__main__":
    sys.exit(main())
