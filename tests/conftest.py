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
