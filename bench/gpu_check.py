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

Output: gpu_check.json (one key per part: its numbers, or {"status": "failed"|"timeout", "error": ...}) and
gpu_check.log (each part's stderr tail) in --out ($OUT, else bench/results/). Without CUDA and without
`--device cpu` it prints a line and exits 0 (so `make bench`'s loop over bench/*.py does not run it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# configs + tokenizers only, copied by bench/gpu_prepare.sh into the carried (git-ignored) .whl/ folder
GPU_MODELS = ROOT / ".whl" / "gpu_models"
MODELS = ("smollm2", "qwen2.5-0.5b")
# per-part caps in seconds on the GPU (the whole run must stay <= 8 minutes with the wheel install)
PART_CAPS = {"env": 45, "cpt:smollm2": 100, "cpt:qwen2.5-0.5b": 130, "align": 70, "packing": 90}
# dense bf16 peaks (TFLOP/s, no sparsity) by device-name fragment, most specific first
BF16_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0),
              ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
STAGES = {"data_recipes": "data_recipes", "finetune": "finetune", "generate": "generate", "align": "align",
          "align.ctr": "align/ctr", "prompts": "prompts"}


# ---------------------------------------------------------------------------- import plumbing


def ensure_recforge() -> None:
    """`recforge.<stage>` importable from this checkout without installing it (the GPU machine has no recforge):
    pyproject maps the top-level stage folders to `recforge.<stage>`; do the same mapping with import specs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if os.environ.get("GPU_CHECK_SHIM") != "1":
        try:
            import recforge.finetune  # noqa: F401  (an installed / editable recforge)
            return
        except ImportError:
            pass
    import importlib.util

    import recforge

    for name, folder in STAGES.items():
        full = f"recforge.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        parent, _, leaf = full.rpartition(".")
        setattr(sys.modules[parent], leaf, module)
    recforge.__dict__.setdefault("_gpu_check_shim", True)


def block_modules(names: str) -> None:
    """GPU_CHECK_BLOCK=a,b: make these imports fail (and `importlib.util.find_spec` say absent), to mimic the GPU
    image, which lacks them, in a CPU venv that has them."""
    for name in names.split(","):
        if name.strip():
            sys.modules[name.strip()] = None  # `import name` -> ImportError; find_spec(name) -> None


def load_bench_module(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- shared helpers


class Clock:
    """The worker's deadline: loops stop early (recording how many steps they ran) rather than be killed."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(torch, device: str):
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    try:
        import resource

        return {"cpu_process_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    except Exception:
        return None


def peak_tflops(torch, device: str, override: float | None) -> dict:
    """The bf16 dense peak MFU is taken against, and where it came from."""
    if override:
        return {"bf16_peak_tflops": override, "source": "--peak-tflops"}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for frag, tflops in BF16_PEAKS:
            if frag in name:
                return {"bf16_peak_tflops": tflops, "source": f"datasheet dense bf16 for {frag!r} ({name})"}
        return {"bf16_peak_tflops": None, "source": f"unknown device {name!r}: pass --peak-tflops"}
    # CPU smoke: bench/finetune_cpu_efficiency.py's own peak (cores x clock x FLOP/cycle)
    peak = load_bench_module("finetune_cpu_efficiency").cpu_peak()
    return {"bf16_peak_tflops": round(peak["bf16_peak_gflops"] / 1000, 4), "source": "finetune_cpu_efficiency.cpu_peak()"}


def measured_mm_tflops(torch, device: str, n: int, reps: int = 10) -> float:
    """Best bf16 n^3 matmul rate on this device (the practical ceiling beside the datasheet peak)."""
    if device == "cpu":
        return round(load_bench_module("finetune_cpu_efficiency").measured_matmul_gflops(torch, torch.bfloat16, n, 3) / 1000, 4)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(torch, device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(torch, device)
        best = min(best, time.perf_counter() - t)
    return round(2 * n**3 / best / 1e12, 1)


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft", "accelerate", "sentence-transformers", "tokenizers", "trl",
                 "datasets", "pydantic", "pyarrow", "huggingface-hub", "flash-attn", "typing-extensions"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def random_model(name: str, work: Path, smoke: bool) -> Path:
    """A model folder like runs/models/<name> (float32 safetensors + tokenizer) with random weights from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = work / "models" / name
    if (out / "model.safetensors").is_file():
        return out
    src = GPU_MODELS / name
    cfg = AutoConfig.from_pretrained(src)
    if smoke:
        cfg.num_hidden_layers = 2  # the CPU smoke run: same code path, a fraction of the compute
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:2]
    torch.manual_seed(0)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in src.iterdir():
        if f.name != "config.json" and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    del model
    tmp.rename(out)
    return out


def corpus_segments(tok, max_length: int) -> list[list[int]]:
    """The shipped ESCI + goodbooks documents as isolated segments (bench/finetune_cpu_efficiency.py's data)."""
    from recforge.finetune.demo import esci_rows, goodbooks_rows
    from recforge.finetune.packing import row_segments

    docs = [d for r in esci_rows() + goodbooks_rows(None) for d in r["documents"]]
    return [s for d in docs for s in row_segments(tok, [d], "isolated", max_length)]


def to_device(batch: dict, device: str) -> dict:
    """Tensors to `device`; anything else (TRL's collator adds plain ints) as it is."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


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


# ---------------------------------------------------------------------------- parts


def part_env(args, clock: Clock) -> dict:
    import torch

    out = {"versions": versions(), "device": args.device, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count()}
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        try:
            out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except Exception as err:
            out["nvidia_smi"] = f"unavailable: {err}"
    out["peak"] = peak_tflops(torch, args.device, args.peak_tflops)
    n = 512 if args.smoke else 8192
    out["peak"][f"measured_bf16_mm_{n}_tflops"] = measured_mm_tflops(torch, args.device, n)
    return out


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
            res = part_env(args, clock)
        elif part.startswith("cpt:"):
            res = part_cpt(args, clock, part.split(":", 1)[1])
        elif part == "align":
            res = part_align(args, clock)
        elif part == "packing":
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
