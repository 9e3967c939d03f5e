"""Shared by bench/gpu_check.py's parts: paths and caps, the import plumbing that makes `recforge.<stage>` importable
from a bare checkout (the GPU machine has no recforge installed), the deadline clock, device helpers (sync, peak
memory, the bf16 peak MFU is taken against, a measured matmul ceiling), random-init model folders, the shipped
corpus as packed segments, and the `env` part.

bench/ is not a package: the driver runs as `python bench/gpu_check.py` (bench/ on sys.path), and its part modules
(gpu_check_cpt.py, gpu_check_align.py, gpu_check_packing.py) import this one by its bare name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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
