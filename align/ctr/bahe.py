"""BAHE (Ant Group, SIGIR 2024): long textual behaviour histories for LLM-based CTR at a fraction of the cost.

- Atomic encoding: the LLM's first k layers (frozen) encode each *distinct* behaviour text once (mean over
  its tokens); the vectors go into a versioned table keyed by the normalised text's hash, with the model's
  content fingerprint, k and the pooling in its contract (`features.cached_text_vectors`).
- Upper layers k+1..L of the same LLM (LoRA or full) take a user's behaviour-vector sequence as
  `inputs_embeds`, positions counting behaviours (0..n-1), and are pooled into a user vector; the target
  item goes through the same path as a one-behaviour sequence from its cached vector.
- Both vectors enter the existing DIN / DCN head next to the ID features (`CTRModel`, MLP or KAR adaptor).

Every sequence starts with a sink token (BOS, else EOS) that no pooling includes: a decoder's first
position carries "massive activations" (norms ~100x the others in SmolLM2), so a behaviour's mean
without it is its own tokens' meaning, and the upper layers see [sink, behaviour 1, ..., behaviour n]
as they saw [sink, token, ...] in pre-training. The sink's lower-layer state is computed once.

`llm_ctr` is the baseline BAHE is measured against: the same model and head, but the history's titles
joined into one text, and the target's title, run through all L layers as tokens.

The split reuses the model's own forward on sub-models that share its modules (embeddings, rotary
embedding, layers, final norm), so attention masks and RoPE are transformers' own; `split_backbone`
checks once that lower+upper reproduces the full model and refuses architectures where it does not
(e.g. ones that rescale `inputs_embeds`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recforge.align.ctr.config import CTRRecipe, LLMConfig, ModelConfig, TrainConfig
from recforge.align.ctr.data import CTRData, SampleArrays, render_template
from recforge.align.ctr.features import cached_text_vectors, text_key
from recforge.align.ctr.models import CTRModel
from recforge.align.ctr.train import fit, metrics
from recforge.config import RecforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- the LLM split


def resolve_llm(name_or_path: str) -> Path:
    """A recipe's model name -> a local HF folder (aliases such as `smollm2` through recforge.models)."""
    from recforge.models import resolve_model_folder

    return resolve_model_folder(name_or_path, "model.llm.model")


def load_backbone(path: str | Path, dtype: str = "float32"):
    """(tokenizer, base decoder without the LM head), in eval mode, all weights frozen."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from recforge.models import check_model_folder

    check_model_folder(path, "backbone")  # a finished run, safetensors only, no code from the folder
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "lm_head.weight UNEXPECTED" load report is expected: no head is needed
    hf_logging.disable_progress_bar()
    try:
        base = AutoModel.from_pretrained(str(path), dtype=DTYPES[dtype])
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    base.config.use_cache = False
    base.requires_grad_(False)
    return tokenizer, base.eval()


def _sub_model(base: nn.Module, start: int, stop: int, final_norm: bool) -> nn.Module:
    """The base model restricted to layers[start:stop], sharing every module (no weight is copied)."""
    cfg = copy.deepcopy(base.config)
    cfg.num_hidden_layers = stop - start
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[start:stop]
    with torch.device("meta"):
        sub = type(base)(cfg)
    sub.embed_tokens = base.embed_tokens
    sub.layers = nn.ModuleList(list(base.layers)[start:stop])
    sub.norm = base.norm if final_norm else nn.Identity()
    sub.rotary_emb = base.rotary_emb
    left = [n for n, p in list(sub.named_parameters()) + list(sub.named_buffers()) if p.is_meta]
    if left:
        raise RecforgeError(f"model.llm.model: {type(base).__name__} has modules BAHE cannot split ({left[:3]})")
    return sub.eval()


def split_backbone(base: nn.Module, k: int, check: bool = True) -> tuple[nn.Module, nn.Module]:
    """(lower: layers 1..k, no final norm; upper: layers k+1..L + final norm), sharing the base's modules."""
    n = base.config.num_hidden_layers
    if not 1 <= k < n:
        raise RecforgeError(f"model.llm.lower_layers: {k} is not in 1..{n - 1} (the model has {n} layers)")
    lower, upper = _sub_model(base, 0, k, final_norm=False), _sub_model(base, k, n, final_norm=True)
    if check:
        _check_split(base, lower, upper)
    return lower, upper


@torch.no_grad()
def _check_split(base, lower, upper) -> None:
    ids = torch.arange(3, 9).unsqueeze(0) % base.config.vocab_size
    full = base(input_ids=ids).last_hidden_state
    hidden = lower(input_ids=ids).last_hidden_state
    split = upper(inputs_embeds=hidden, position_ids=torch.arange(ids.shape[1]).unsqueeze(0)).last_hidden_state
    if not torch.allclose(full, split, atol=1e-3 * max(1.0, full.abs().max().item())):
        raise RecforgeError(f"model.llm.model: lower + upper layers of {type(base).__name__} do not reproduce its "
                            "forward (it rescales inputs_embeds?); BAHE supports Llama/Qwen-style decoders")


def default_lower_layers(n_layers: int) -> int:
    return max(1, n_layers // 2)


# ------------------------------------------------------------------------------------ atomic encoding


def sink_token(tokenizer) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """A text's own token ids (no special tokens; the sink is added by whoever runs the model)."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [x if x else [sink_token(tokenizer)] for x in ids]  # an empty text still gets one position


def pad_right(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def run_with_sink(model: nn.Module, seqs: list[list[int]], sink: int, pooling: str = "mean") -> torch.Tensor:
    """[sink] + tokens through `model`, pooled over the tokens only (mean, or the last token)."""
    ids, mask = pad_right([[sink] + s for s in seqs])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    mask[:, 0] = 0
    return _pool(hidden, mask, pooling)


@torch.no_grad()
def encode_texts(lower: nn.Module, tokenizer, texts: list[str], max_tokens: int, batch_size: int,
                 desc: str = "encoding") -> np.ndarray:
    """Mean-pooled outputs of `lower` per text (sink excluded), in length-sorted batches with a progress bar."""
    from tqdm.auto import tqdm

    tokens = tokenize_texts(tokenizer, texts, max_tokens)
    order = np.argsort([len(t) for t in tokens], kind="stable")
    out = np.zeros((len(texts), lower.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=len(order) <= batch_size):
        rows = order[start : start + batch_size]
        out[rows] = run_with_sink(lower, [tokens[i] for i in rows], sink_token(tokenizer)).float().numpy()
    return out


@torch.no_grad()
def sink_state(lower: nn.Module, tokenizer) -> np.ndarray:
    """The sink token's output of the lower layers: position 0 of every upper-layer sequence."""
    return lower(input_ids=torch.tensor([[sink_token(tokenizer)]])).last_hidden_state[0, 0].float().numpy()


def behaviour_contract(model_dir: Path, base: nn.Module, k: int, llm: LLMConfig) -> dict[str, Any]:
    """What the cached vectors depend on: any change refuses the table instead of mixing vectors."""
    from recforge.fingerprint import folder_digest

    return {"cache_kind": "bahe_behaviours", "model_fingerprint": folder_digest(model_dir), "lower_layers": k,
            "num_layers": base.config.num_hidden_layers, "pooling": f"{llm.pooling}, sink excluded",
            "max_tokens": llm.max_behaviour_tokens, "compute_dtype": llm.dtype}


def behaviour_texts(item_ids: list[str], items: dict, template: str) -> list[str]:
    """One behaviour text per item index (index i -> texts[i - 1]); an item without text is named by its id."""
    texts = []
    for item_id in item_ids:
        fields = items[item_id].fields if item_id in items else {}
        texts.append(render_template(template, fields) or f"item {item_id}")
    return texts


def build_behaviour_matrix(texts: list[str], table_dir: Path, model_dir: Path, tokenizer, base, lower, k: int,
                           llm: LLMConfig) -> tuple[np.ndarray, dict]:
    """(n_items + 1, H) behaviour vectors by item index (row 0 = padding) from the cached table."""
    contract = behaviour_contract(model_dir, base, k, llm)

    def encode(new_texts: list[str]) -> np.ndarray:
        return encode_texts(lower, tokenizer, new_texts, llm.max_behaviour_tokens, llm.cache_batch_size, "BAHE behaviours")

    index, vectors, info = cached_text_vectors(table_dir, name="bahe_behaviours", entity="behaviour", texts=texts,
                                               contract=contract, model=str(model_dir), dimension=base.config.hidden_size,
                                               encode=encode, config_key="model.llm.cache_dir")
    rows = [index[text_key(t)] for t in texts]
    return np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors[rows]]), info


# ------------------------------------------------------------------------------------------- towers


def right_align(history: torch.Tensor) -> torch.Tensor:
    """Left-padded histories (most recent last) -> behaviours first, padding after, order kept.

    Right padding keeps every query position able to attend to at least one real behaviour (no fully
    masked attention rows), and behaviour j gets position j whatever the history's length.
    """
    order = torch.argsort((history == 0).to(torch.int8), dim=1, stable=True)
    return history.gather(1, order)


class UpperTower(nn.Module):
    """Layers k+1..L over [sink, behaviour vectors] -> one vector (mean or last over the behaviours)."""

    def __init__(self, upper: nn.Module, sink: np.ndarray, pooling: str):
        super().__init__()
        self.upper = upper
        self.register_buffer("sink", torch.from_numpy(np.asarray(sink, np.float32)), persistent=False)
        self.pooling = pooling

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """vectors (B, n, H) right-padded, mask (B, n) -> (B, H)."""
        sink = self.sink.to(vectors.dtype).expand(len(vectors), 1, -1)
        mask = torch.cat([torch.ones(len(mask), 1, dtype=torch.long), mask.long()], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # the sink at 0, behaviour j at j + 1
        hidden = self.upper(inputs_embeds=torch.cat([sink, vectors], dim=1), attention_mask=mask,
                            position_ids=positions).last_hidden_state
        return _pool(hidden[:, 1:], mask[:, 1:], self.pooling)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "last":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last position the mask keeps
        return hidden[torch.arange(hidden.shape[0]), last]
    return masked_mean(hidden, mask)


def _unique_rows(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch repeats target items: encode each once."""
    return torch.unique(target, return_inverse=True)


class BAHEModel(nn.Module):
    """Cached behaviour vectors -> upper layers -> user and target vectors -> the DIN / DCN head with IDs."""

    def __init__(self, head_cfg: ModelConfig, n_items: int, behaviour_vectors: np.ndarray, tower: UpperTower, adaptor: str):
        super().__init__()
        dim = behaviour_vectors.shape[1]
        self.register_buffer("vectors", torch.from_numpy(behaviour_vectors), persistent=False)
        self.tower = tower
        self.ctr = CTRModel(head_cfg, n_items, [dim, dim], adaptor)
        self.head_norm = nn.LayerNorm(dim)  # see `head_inputs`

    def forward(self, target, history, history_rating) -> torch.Tensor:
        seq = right_align(history)
        mask = seq > 0
        mask[:, 0] = True  # a history-less sample still has one (zero) position to pool
        vectors = self.vectors.to(next(self.tower.parameters()).dtype)
        user = self.tower(vectors[seq], mask).float()
        items, inverse = _unique_rows(target)
        item = self.tower(vectors[items].unsqueeze(1), torch.ones(len(items), 1, dtype=torch.bool)).float()[inverse]
        return self.ctr(target, history, history_rating, head_inputs(self.head_norm, user, item))


class LLMCTRModel(nn.Module):
    """The baseline: the history's titles as one text, and the target's title, through all L layers as tokens."""

    def __init__(self, head_cfg: ModelConfig, n_items: int, item_tokens: list[list[int]], separator: list[int],
                 sink: int, full: nn.Module, pooling: str, adaptor: str):
        super().__init__()
        self.item_tokens = [[]] + item_tokens  # by item index; 0 = padding
        self.separator = separator
        self.sink = sink
        self.full = full
        self.pooling = pooling
        dim = full.config.hidden_size
        self.ctr = CTRModel(head_cfg, n_items, [dim, dim], adaptor)
        self.head_norm = nn.LayerNorm(dim)

    def history_text_tokens(self, history: torch.Tensor) -> list[list[int]]:
        out = []
        for row in history.tolist():
            parts = [self.item_tokens[i] for i in row if i > 0]
            ids = [t for j, p in enumerate(parts) for t in (self.separator if j else []) + p]
            out.append(ids or [self.sink])
        return out

    def encode(self, seqs: list[list[int]]) -> torch.Tensor:
        return run_with_sink(self.full, seqs, self.sink, self.pooling).float()

    def forward(self, target, history, history_rating) -> torch.Tensor:
        user = self.encode(self.history_text_tokens(history))
        items, inverse = _unique_rows(target)
        item = self.encode([self.item_tokens[i] for i in items.tolist()])[inverse]
        return self.ctr(target, history, history_rating, head_inputs(self.head_norm, user, item))


def head_inputs(norm: nn.LayerNorm, user: torch.Tensor, item: torch.Tensor) -> list[torch.Tensor]:
    """LLM states have a few outlier dimensions tens of times the rest: a LayerNorm (part of the head, so
    BAHE and LLM-CTR share it) puts the user and item vectors on the adaptor's scale."""
    return [norm(user), norm(item)]


def wrap_trainable(module: nn.Module, llm: LLMConfig) -> nn.Module:
    """LoRA adapters on the module's linear layers (peft), or every weight trainable (`upper: full`)."""
    if llm.upper == "full":
        return module.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=llm.lora_r, lora_alpha=llm.lora_alpha, lora_dropout=llm.lora_dropout,
                      target_modules=llm.lora_target_modules, bias="none")
    return get_peft_model(module, lora)


# --------------------------------------------------------------------------------------- building / training


@dataclass
class LLMSetup:
    """What one run builds once and every seed reuses: the frozen base, the behaviour vectors, the item tokens."""

    model_dir: Path
    tokenizer: Any
    base: nn.Module
    k: int
    vectors: np.ndarray
    sink: np.ndarray  # the sink token's lower-layer state
    item_tokens: list[list[int]]
    separator: list[int]
    cache: dict


def prepare_llm(llm: LLMConfig, data: CTRData, items: dict, table_dir: Path, need_tokens: bool) -> LLMSetup:
    model_dir = resolve_llm(llm.model)
    tokenizer, base = load_backbone(model_dir, llm.dtype)
    k = llm.lower_layers or default_lower_layers(base.config.num_hidden_layers)
    lower, _ = split_backbone(base, k)
    texts = behaviour_texts(data.item_ids, items, llm.behaviour_template)
    vectors, cache = build_behaviour_matrix(texts, table_dir, model_dir, tokenizer, base, lower, k, llm)
    item_tokens = tokenize_texts(tokenizer, texts, llm.max_behaviour_tokens) if need_tokens else []
    separator = tokenizer(llm.history_separator, add_special_tokens=False)["input_ids"]
    return LLMSetup(model_dir, tokenizer, base, k, vectors, sink_state(lower, tokenizer), item_tokens, separator, cache)


def build_model(kind: str, setup: LLMSetup, model_cfg: ModelConfig, n_items: int, adaptor: str, fresh_base: bool) -> nn.Module:
    """A BAHE or LLM-CTR model around a (fresh, when several seeds share the setup) copy of the LLM."""
    llm = model_cfg.llm
    if kind == "bahe":
        _, upper = split_backbone(setup.base, setup.k, check=False)
        upper.embed_tokens = None  # inputs are cached vectors: neither token embeddings nor lower layers train
        upper = copy.deepcopy(upper) if fresh_base else upper
        tower = UpperTower(wrap_trainable(upper, llm), setup.sink, llm.user_pooling)
        return BAHEModel(model_cfg, n_items, setup.vectors, tower, adaptor)
    base = copy.deepcopy(setup.base) if fresh_base else setup.base
    return LLMCTRModel(model_cfg, n_items, setup.item_tokens, setup.separator, sink_token(setup.tokenizer),
                       wrap_trainable(base, llm), llm.user_pooling, adaptor)


def optimizer(model: nn.Module, train_cfg: TrainConfig, llm_lr: float) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    llm = [p for n, p in trainable if n.startswith(("tower.", "full."))]  # the LLM's own weights (LoRA or all)
    head = [p for n, p in trainable if not n.startswith(("tower.", "full."))]
    return torch.optim.AdamW([{"params": head, "lr": train_cfg.learning_rate}, {"params": llm, "lr": llm_lr}],
                             weight_decay=train_cfg.weight_decay)


@torch.no_grad()
def predict_llm(model: nn.Module, split: SampleArrays, batch_size: int) -> np.ndarray:
    model.eval()
    target, history, rating = (torch.from_numpy(a) for a in (split.target, split.history, split.history_rating))
    out = [torch.sigmoid(model(target[s : s + batch_size], history[s : s + batch_size], rating[s : s + batch_size]))
           for s in range(0, len(split), batch_size)]
    return torch.cat(out).float().numpy() if out else np.zeros(0)


def train_llm_ctr(kind: str, setup: LLMSetup, splits: dict[str, SampleArrays], n_items: int, model_cfg: ModelConfig,
                  train_cfg: TrainConfig, seed: int, adaptor: str = "mlp", fresh_base: bool = True) -> dict:
    """Train a BAHE / LLM-CTR model with the CTR bridge's loop; test metrics of the best validation epoch."""
    return train_llm_ctr_model(kind, setup, splits, n_items, model_cfg, train_cfg, seed, adaptor, fresh_base)[1]


def train_llm_ctr_model(kind: str, setup: LLMSetup, splits: dict[str, SampleArrays], n_items: int, model_cfg: ModelConfig,
                        train_cfg: TrainConfig, seed: int, adaptor: str = "mlp", fresh_base: bool = True):
    """`train_llm_ctr`, also returning the trained model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    model = build_model(kind, setup, model_cfg, n_items, adaptor, fresh_base)
    optim = optimizer(model, train_cfg, model_cfg.llm.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    train = splits["train"]
    target, history, rating, label = (torch.from_numpy(a) for a in (train.target, train.history, train.history_rating, train.label))
    eval_bs = model_cfg.llm.eval_batch_size

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(target[idx], history[idx], rating[idx]), label[idx])

    fitted = fit(model, optim, len(train), batch_loss, lambda: predict_llm(model, splits["valid"], eval_bs),
                 splits["valid"].label, train_cfg, rng, progress=True)
    test = metrics(splits["test"].label, predict_llm(model, splits["test"], eval_bs))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {"seed": seed, "adaptor": adaptor, "dense_inputs": [f"{kind}_user", f"{kind}_item"], "variant": kind,
                   "trainable_params": trainable, "lower_layers": setup.k, **fitted.result(test)}


def run_bahe_variants(cfg: CTRRecipe, data: CTRData, items: dict, out: Path, log) -> tuple[list[dict], dict]:
    """`model.backbone: bahe`: IDs-only, BAHE (and LLM-CTR when asked) over the recipe's seeds."""
    from recforge.align.ctr.train import train_ctr

    llm = cfg.model.llm
    table_dir = Path(llm.cache_dir) if llm.cache_dir else out / "features" / "bahe_behaviours"
    setup = prepare_llm(llm, data, items, table_dir, need_tokens=llm.compare_llm_ctr or cfg.model.backbone == "llm_ctr")
    kinds = ["bahe", "llm_ctr"] if llm.compare_llm_ctr else [cfg.model.backbone]
    adaptor = cfg.adaptors[0] if cfg.adaptors else "mlp"
    results = []
    for seed in cfg.seeds:
        base = train_ctr(data.splits, len(data.item_ids), [], cfg.model, cfg.train, None, seed)
        results.append({**base, "variant": "ids_only"})
        log(results[-1])
        for kind in kinds:
            results.append(train_llm_ctr(kind, setup, data.splits, len(data.item_ids), cfg.model, cfg.train, seed, adaptor))
            log(results[-1])
    report = {"llm": {"model": str(setup.model_dir), "layers": setup.base.config.num_hidden_layers, "lower_layers": setup.k,
                      "hidden_size": setup.base.config.hidden_size, "upper": llm.upper}, "behaviour_cache": setup.cache}
    return results, report
