"""Export: a folder that plain `SentenceTransformer(path)` loads (no recforge import), with a model card.

The folder holds modules.json, the pooling/normalize configs, prompts, max_seq_length and the
tokenizer with its fixed post-processor (EOS or compression suffix appended). LoRA runs are merged
into the base weights first. `check_export` re-loads the folder and compares vectors with the
in-memory model under left and right padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recforge.io import atomic_write_json, atomic_write_text


def merge_lora(model) -> bool:
    """Merge a peft adapter wrapped around the transformer into its weights. Returns True if one was merged."""
    from peft import PeftModel

    transformer = model[0]
    # sentence-transformers 6: `auto_model` is a read-only alias of the `model` submodule; set `model`
    if isinstance(getattr(transformer, "model", None), PeftModel):
        transformer.model = transformer.model.merge_and_unload()
        return True
    return False


def encode_both_paddings(model, texts: list[str], prompt_name: str | None = None, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Vectors of `texts` with the tokenizer padding on the right and on the left (batches mix lengths)."""
    tok = model[0].tokenizer
    original = tok.padding_side
    out = {}
    try:
        for side in ("right", "left"):
            tok.padding_side = side
            prompt = prompt_name if prompt_name in (model.prompts or {}) else None
            out[side] = model.encode(texts, prompt_name=prompt, batch_size=batch_size, convert_to_numpy=True,
                                     show_progress_bar=False)
    finally:
        tok.padding_side = original
    return out


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def check_export(reference: dict[str, np.ndarray], export_dir: Path, texts: list[str], prompt_name: str | None,
                 device: str = "cpu") -> dict:
    """Load the export with plain sentence-transformers (on the training device) and compare with `reference`
    (from `encode_both_paddings`)."""
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(str(export_dir), device=device)
    got = encode_both_paddings(loaded, texts, prompt_name)
    return {f"min_cosine_{side}_padding": min_cosine(reference[side], got[side]) for side in ("right", "left")} | {
        "texts": len(texts)}


def model_card(contract: dict, metrics: dict | None) -> str:
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [recforge, embeddings, retrieval]",
        "---",
        "",
        f"# {contract['name']}",
        "",
        "Text-embedding model exported by `recforge align`. Load it with plain sentence-transformers:",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        f"model = SentenceTransformer(\"{contract['name']}\")",
        "q = model.encode_query([\"running shoes\"])      # uses the `query` prompt" if "query" in contract["prompts"]
        else "q = model.encode([\"running shoes\"])",
        "d = model.encode_document([\"Nike Air Zoom ...\"])" if "document" in contract["prompts"]
        else "d = model.encode([\"Nike Air Zoom ...\"])",
        "scores = model.similarity(q, d)",
        "```",
        "",
        "## Embedding contract",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("dimension", "normalized", "similarity", "pooling", "prompts", "max_seq_length", "appended_suffix",
                "base_model", "backbone_kind", "lora_merged", "data"):
        lines.append(f"| {key} | `{json.dumps(contract.get(key), ensure_ascii=False)}` |")
    if metrics:
        lines += ["", "## Evaluation (held-out queries)", "", metrics.get("table", "")]
    lines += ["", "The same contract is in `embedding_contract.json`."]
    return "\n".join(lines) + "\n"


def export_model(model, export_dir: Path, info: dict, data_inputs: list[dict], metrics: dict | None = None) -> dict:
    """Save the model (LoRA merged) plus `embedding_contract.json` and a README model card. Returns the contract."""
    export_dir = Path(export_dir)
    merged = merge_lora(model)
    model.save(str(export_dir))
    tok = model[0].tokenizer
    suffix_ids = tok("x")["input_ids"][len(tok("x", add_special_tokens=False)["input_ids"]) + int(tok("x")["input_ids"][0] == tok.bos_token_id):]
    contract = {
        "name": export_dir.name,
        "dimension": model.get_embedding_dimension(),
        "normalized": any(type(m).__name__ == "Normalize" for m in model),
        "similarity": model.similarity_fn_name or "cosine",
        "pooling": info.get("pooling"),
        "prompts": model.prompts or {},
        "max_seq_length": model.max_seq_length,
        "appended_suffix": tok.decode(suffix_ids) if suffix_ids else "",
        "padding_side": tok.padding_side,
        "base_model": info.get("backbone_path"),
        "backbone_kind": info.get("kind"),
        "lora_merged": merged,
        "data": [{k: d.get(k) for k in ("path", "sha256", "rows")} for d in data_inputs],
    }
    atomic_write_json(export_dir / "embedding_contract.json", contract)
    atomic_write_text(export_dir / "README.md", model_card(contract, metrics))
    return contract
