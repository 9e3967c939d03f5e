"""Added special tokens: collect them, resize the model, and give the new rows a sensible start.

New rows start at the mean of the existing rows (or of the rows of a description's tokens), not at
random: a random row in the lm_head makes the new token's logit arbitrary and the first steps noisy.
"""

from __future__ import annotations

import json
from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import resolve_path
from recforge.runstate import unfinished_reason


def tokens_from_manifest(path: str) -> list[str]:
    """The `special_tokens` list of a data_recipes run's manifest.json (file or the run folder)."""
    p = resolve_path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise RecforgeError(f"tokens.from_manifest: no manifest at {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecforgeError(f"{p}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RecforgeError(f"{p}: expected a JSON object (a data run's manifest.json), got {type(data).__name__}")
    # a killed or running data run's manifest lists no tokens yet: reading it would silently add none
    reason = unfinished_reason(data) if "command" in data else None
    if reason:
        raise RecforgeError(f"tokens.from_manifest: {p} is the manifest of an unfinished `recforge "
                            f"{data['command']}` run ({reason}); rerun it to completion")
    tokens = data.get("special_tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise RecforgeError(f"{p}: key 'special_tokens' must be a list of strings")
    return tokens


def collect_tokens(add: list[str], from_manifest: str | None) -> list[str]:
    tokens = list(add)
    if from_manifest:
        tokens += tokens_from_manifest(from_manifest)
    seen: set[str] = set()
    return [t for t in tokens if not (t in seen or seen.add(t))]


def add_special_tokens(model, tokenizer, tokens: list[str], init: str = "mean",
                       descriptions: dict[str, str] | None = None) -> list[int]:
    """Add `tokens` not yet in the vocabulary; resize; initialise the new input and output rows.

    Returns the ids of all requested tokens (new or already present), the rows to keep trainable.
    """
    import torch

    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if not new:
        return ids
    old_rows = model.get_input_embeddings().weight.shape[0]
    # mean_resizing=False: we set the rows ourselves below (transformers' default samples them from a
    # Gaussian around the mean, which makes runs depend on the RNG state)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    descriptions = descriptions or {}
    with torch.no_grad():
        for matrix in _embedding_matrices(model):
            base = matrix[:old_rows]
            mean = base.mean(dim=0)
            for tok in new:
                row = tokenizer.convert_tokens_to_ids(tok)
                value = mean
                if init == "description" and descriptions.get(tok):
                    desc_ids = [i for i in tokenizer(descriptions[tok], add_special_tokens=False)["input_ids"] if i < old_rows]
                    if desc_ids:
                        value = base[desc_ids].mean(dim=0)
                matrix[row] = value.to(matrix.dtype)
    return ids


def _embedding_matrices(model):
    """The input embedding and, when untied, the lm_head weight (its rows are per-token too)."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    mats = [inp]
    if out is not None and out.weight.data_ptr() != inp.data_ptr():
        mats.append(out.weight)
    return mats


def trainable_token_modules(model) -> list[str]:
    """Names (as peft's `trainable_token_indices` keys) of the input embedding and the untied lm_head."""
    names = {}
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is inp:
            names["input"] = name.split(".")[-1]
        elif out is not None and module is out and out.weight.data_ptr() != inp.weight.data_ptr():
            names["output"] = name.split(".")[-1]
    return [names[k] for k in ("input", "output") if k in names]


def save_token_info(out_dir: str | Path, tokens: list[str], ids: list[int]) -> None:
    from recforge.io import atomic_write_json

    atomic_write_json(Path(out_dir) / "added_tokens_recforge.json", {"tokens": tokens, "ids": ids})
