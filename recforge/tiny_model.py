"""A tiny Llama-architecture causal LM with a byte-level BPE tokenizer trained on a given corpus.

There is no model hub on the machines this project is built and tested on, so every stage is
exercised on this model: it is saved in Hugging Face format and loaded with `from_pretrained`
exactly like a hub model (the same code then runs on a real 0.5B-8B model on GPUs).
The weights are random (seeded): it learns only what recforge's own recipes teach it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from pydantic import Field

from recforge.config import RecforgeError, RecipeModel
from recforge.io import atomic_write_text, open_text, resolve_path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML: a template every generate/finetune path can apply with `apply_chat_template`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "sample://esci_us_titles/products.jsonl.gz",
    "sample://esci_us_titles/queries.jsonl.gz",
    "sample://goodbooks_10k_catalog/books.jsonl.gz",
    "sample://goodbooks_10k_book_tags/books_tags.jsonl.gz",
]


class TinyModelConfig(RecipeModel):
    corpus: list[str] = Field(default_factory=lambda: list(DEFAULT_CORPUS))
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int | None = None  # default: 2.75 x hidden, rounded to 8
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0


def iter_corpus_text(paths: list[str]) -> Iterator[str]:
    """Text lines of plain files, and every string value (lists and nested dicts included) of JSONL files."""

    def strings(value) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)

    for p in paths:
        path = resolve_path(p)
        if not path.is_file():
            raise RecforgeError(f"tiny model corpus file not found: {p}")
        is_jsonl = ".jsonl" in path.name or ".json" in path.name
        with open_text(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if is_jsonl:
                    try:
                        yield " ".join(strings(json.loads(line)))
                    except json.JSONDecodeError:
                        yield line
                else:
                    yield line


def train_tokenizer(cfg: TinyModelConfig):
    """A byte-level BPE tokenizer (like GPT-2 / Llama-3 / Qwen) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, UNK, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus_text(cfg.corpus), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: BOS is prepended to every encoded text; EOS is appended by the recipes that need it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=cfg.max_position_embeddings,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path) -> Path:
    """Train the tokenizer, initialise the model with a fixed seed, save both (safetensors) to `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(cfg)
    intermediate = cfg.intermediate_size or int(round(cfg.hidden_size * 2.75 / 8) * 8)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        # A chat turn ends with <|im_end|>; a plain document with </s>.
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write_text(
        out / "recforge_tiny.json",
        json.dumps({**cfg.model_dump(), "n_parameters": n_params, "vocab_size_final": len(tokenizer)}, indent=2),
    )
    return out
