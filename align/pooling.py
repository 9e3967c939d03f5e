"""Build the embedding model: backbone + pooling (+ projection) + L2 norm, as plain sentence-transformers modules.

Everything here is expressed with standard sentence-transformers modules (Transformer, Pooling, Dense,
Normalize) and a tokenizer whose post-processor is fixed, so the exported folder loads with
`SentenceTransformer(path)` and no recforge import, and gives the same vectors as during training.

- last token: the tokenizer post-processor appends EOS to every text (kept under truncation), and
  `Pooling(lasttoken)` picks the last attended position, which is right under left and right padding.
- compression (NoteLLM): the prompt ends in `... compress it into one word: "[EMB]"` and the embedding is
  the hidden state just before `[EMB]`. A causal LM's state at a position never depends on later tokens,
  so that state equals the last-token state of the text followed by the suffix up to the opening quote.
  The post-processor appends that suffix (as token ids), and last-token pooling takes it.
- mean: `Pooling(mean, include_prompt=False)` leaves the instruction prompt's tokens out of the average.
  sentence-transformers counts the prompt's tokens by tokenizing the prompt alone; a prompt ending in a space
  (`"Query: "`) alone has one token more than it occupies in `prompt + text`, where the space merges into the
  first word (`Ġred`). `fix_prompt_tokenization` makes the two counts agree in the tokenizer itself (trailing
  whitespace stripped by its normalizer, saved in tokenizer.json), and checks every prompt against the count
  taken from joined texts, so the first content word always counts and a one-word query is never a zero vector.
- middle layer: `backbone.num_layers` keeps the first N transformer layers (the config saved with the export
  says so), so the vector is that layer's state and both training and inference run only N layers.
"""

from __future__ import annotations

import json
from pathlib import Path

from recforge.config import RecforgeError

from .align_config import BackboneConfig, PoolingConfig

COMPRESS_TOKEN = "<recforge_compress>"


def resolve_backbone_path(path: str, cache_root: str = "runs") -> Path:
    """An alias (`minilm` / `smollm2` / `qwen2.5-0.5b`, or `tiny`: the tiny LM built once under
    `<cache_root>/tiny-model`) or a local folder -> the backbone's model folder (`recforge.models.resolve_model`)."""
    from recforge.models import resolve_model_folder

    return resolve_model_folder(path, "backbone.path", tiny_root=cache_root)


def truncation_kwargs(path: Path, num_layers: int | None) -> dict:
    """Config overrides keeping the first `num_layers` transformer layers (a middle layer's state as output)."""
    if not num_layers:
        return {}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    total = config.get("num_hidden_layers")
    if total is None:
        raise RecforgeError(f"backbone.num_layers: {path}/config.json has no num_hidden_layers")
    if num_layers >= total:  # a smaller model than the recipe was written for: all of its layers
        import logging

        logging.getLogger("recforge.align").warning("backbone.num_layers=%d: %s has %d layers, all kept", num_layers, path, total)
        return {}
    out = {"num_hidden_layers": num_layers}
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = config["layer_types"][:num_layers]
    return out


def detect_kind(path: Path) -> str:
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    archs = config.get("architectures") or []
    return "causal_lm" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"


def resolve_pooling_mode(pooling: PoolingConfig, kind: str) -> str:
    if pooling.mode != "auto":
        return pooling.mode
    return "last_token" if kind == "causal_lm" else "mean"


def configure_tokenizer(tokenizer, mode: str, compression_suffix: str) -> None:
    """Make the tokenizer itself append EOS (last_token) or the compression suffix (compression).

    Done in the fast tokenizer's post-processor, which is saved in tokenizer.json: every consumer of the
    exported folder gets the same token ids as training, and truncation keeps room for the appended ids.
    """
    from tokenizers import processors

    if mode not in ("last_token", "compression"):
        return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = tokenizer("probe", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None
    specials = [(bos, tokenizer.bos_token_id)] if bos else []
    head = [bos] if bos else []
    if mode == "last_token":
        if tokenizer.eos_token_id is None:
            raise RecforgeError("pooling.mode=last_token needs a tokenizer with an EOS token")
        specials.append((tokenizer.eos_token, tokenizer.eos_token_id))
        tail = [tokenizer.eos_token]
    else:
        ids = tokenizer(compression_suffix, add_special_tokens=False)["input_ids"]
        specials.append({"id": COMPRESS_TOKEN, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)})
        tail = [COMPRESS_TOKEN]
    single = " ".join([*head, "$A", *tail])
    pair = " ".join([*head, "$A", *tail, "$B:1", *tail])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


PROMPT_PROBES = ("x", "red shoes", "Nike air max", "1 tb ssd", "The", "iphone 13 case", "(new) lamp")


def prompt_tokens_in_joined(tokenizer, prompt: str, text: str) -> int:
    """How many leading token positions of `prompt + text` hold the prompt only (special tokens before it
    included): tokens up to the first one whose characters reach into `text` (`Ġred` of `"Query: red"` is text)."""
    enc = tokenizer(prompt + text, return_offsets_mapping=True)
    n = 0
    for start, end in enc["offset_mapping"]:
        if end > len(prompt):
            break
        n += 1
    return n


def standalone_prompt_length(transformer, prompt: str) -> int | None:
    """The prompt length sentence-transformers' pooling uses (the prompt tokenized alone, trailing special off)."""
    cache = getattr(transformer, "_prompt_length_mapping", None)
    if isinstance(cache, dict):
        cache.clear()
    return transformer._get_prompt_length(prompt)


def _strip_trailing_whitespace(tokenizer) -> None:
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    strip = normalizers.Strip(left=False, right=True)
    backend.normalizer = strip if backend.normalizer is None else normalizers.Sequence([backend.normalizer, strip])


def fix_prompt_tokenization(transformer, prompts: list[str], strict: bool = True) -> dict[str, int]:
    """Make the prompt token count sentence-transformers uses equal the count the prompt occupies in the joined
    text, for each prompt. Returns {prompt: token count}.

    The count is taken from joined texts (`prompt_tokens_in_joined` over a few probe texts). Where the prompt
    alone tokenizes longer (a trailing space that merges into the first word), the tokenizer gets a normalizer
    stripping trailing whitespace: the prompt alone then tokenizes as it does in front of a text, and a text
    loses nothing (whitespace at its end makes no token a model needs). `strict`: a prompt whose count still
    disagrees (it merges with the first word in another way, e.g. ends in a letter) is an error.
    """
    tokenizer = transformer.tokenizer
    counts: dict[str, int] = {}
    for prompt in dict.fromkeys(p for p in prompts if p):
        joined = {prompt_tokens_in_joined(tokenizer, prompt, t) for t in PROMPT_PROBES}
        alone = standalone_prompt_length(transformer, prompt)
        if alone is not None and alone != min(joined) and prompt != prompt.rstrip():
            _strip_trailing_whitespace(tokenizer)
            joined = {prompt_tokens_in_joined(tokenizer, prompt, t) for t in PROMPT_PROBES}
            alone = standalone_prompt_length(transformer, prompt)
        # texts whose first character does not merge with the space (a digit under SmolLM2's digit splitting)
        # leave the space its own token: the prompt then takes one more position, and that whitespace token
        # joins the average; never the other way round (a content token left out)
        if strict and alone != min(joined):
            raise RecforgeError(
                f"prompt {prompt!r}: it takes {min(joined)} token(s) in front of a text but {alone} alone, so "
                "mean pooling cannot leave exactly the prompt out: end the prompt in a separator such as ': '")
        counts[prompt] = min(joined)
    return counts


def build_embedding_model(backbone: BackboneConfig, pooling: PoolingConfig, prompts: dict[str, str] | None = None,
                          cache_root: str = "runs"):
    """A SentenceTransformer ready to train. Returns (model, info) with the resolved kind/pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    from recforge.models import check_model_folder

    path = resolve_backbone_path(backbone.path, cache_root)
    check_model_folder(path, "backbone.path", backbone.trust_remote_code)  # finished run, safetensors only, no folder code
    kind = backbone.kind if backbone.kind != "auto" else detect_kind(path)
    mode = resolve_pooling_mode(pooling, kind)
    model_kwargs = {"trust_remote_code": backbone.trust_remote_code}
    config_kwargs = {"trust_remote_code": backbone.trust_remote_code, **truncation_kwargs(path, backbone.num_layers)}
    if backbone.dtype != "float32":
        model_kwargs["dtype"] = backbone.dtype  # an LLM backbone in bf16 needs half the memory

    is_plain_st = (path / "modules.json").is_file() and pooling.mode == "auto" and pooling.projection_dim is None
    prompt_counts: dict[str, int] = {}
    if is_plain_st and kind == "encoder":
        # A sentence-transformers encoder (MiniLM): keep its own pooling and normalisation.
        model = SentenceTransformer(str(path), trust_remote_code=backbone.trust_remote_code)
        model.max_seq_length = backbone.max_seq_length
    else:
        # Pinned to the plain-text modality: with a chat template present, sentence-transformers would
        # otherwise wrap every text in it (`<|im_start|>user ...`), and the pooled token would be the template's.
        transformer = Transformer(str(path), max_seq_length=backbone.max_seq_length, model_kwargs=model_kwargs,
                                  config_kwargs=config_kwargs,
                                  modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                                  module_output_name="token_embeddings")
        if kind == "causal_lm" and mode in ("cls",):
            raise RecforgeError("pooling.mode=cls makes no sense for a causal LM: use last_token, mean or compression")
        configure_tokenizer(transformer.tokenizer, mode, pooling.compression_suffix)
        st_mode = {"last_token": "lasttoken", "compression": "lasttoken", "mean": "mean", "cls": "cls"}[mode]
        dim = transformer.get_embedding_dimension()
        # the prompt's tokens are left out of a mean only: there its count must be exact (any prompt, any mode
        # gets the trailing-whitespace normalizer, so `prompt_length` is right wherever it is read)
        prompt_counts = fix_prompt_tokenization(transformer, list((prompts or {}).values()), strict=(mode == "mean"))
        modules = [transformer, Pooling(dim, pooling_mode=st_mode, include_prompt=(mode != "mean"))]
        if pooling.projection_dim:
            if pooling.projection == "mlp":
                modules.append(Dense(dim, dim, activation_function=__import__("torch").nn.GELU()))
            modules.append(Dense(dim, pooling.projection_dim, activation_function=None))
        if pooling.normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules)
    if prompts:
        model.prompts = {**(model.prompts or {}), **prompts}
        if not prompt_counts and hasattr(model[0], "tokenizer") and hasattr(model[0], "_get_prompt_length"):
            # a sentence-transformers encoder kept as it is: the same check on its own tokenizer
            include = all(getattr(m, "include_prompt", True) for m in model)
            prompt_counts = fix_prompt_tokenization(model[0], list(prompts.values()), strict=not include)
    info = {"backbone_path": str(path), "kind": kind, "pooling": mode,
            "embedding_dim": model.get_embedding_dimension(), "prompt_tokens": prompt_counts}
    if backbone.num_layers:
        info["num_layers"] = backbone.num_layers
    return model, info
