"""NoteLLM's joint loss for causal-LM backbones: (InfoNCE + α · generation loss) / (1 + α).

Besides pulling related items together, the LLM learns to *generate* each item's category or a few of its
hashtags right after the compression word (NoteLLM: 40 % of samples do hashtags, the rest category).
Generation targets come from the training pairs (`item_tag` rows: item id -> its tags, e.g. goodbooks
shelf tags from data_recipes) or from a catalogue file with a tags and/or category field.

Why custom: sentence-transformers' losses only ever see pooled sentence embeddings, and its trainer feeds
them tokenised *texts*; a generation term needs token-level logits over target tokens that the embedding
texts do not contain, and an LM head that the embedding model (a headless `AutoModel`) does not have.
So this module wraps the contrastive loss (ST's MultipleNegativesRankingLoss or recforge's InfoNCELoss,
unchanged) and adds the generation term, still inside `SentenceTransformerTrainer` (its optimiser also
trains loss-owned parameters such as the LM head here).

NoteLLM runs one forward pass over `prompt + [EMB] + target`; here the generation text is a second pass
over `text + suffix + target`. For a causal LM the hidden state at the pooled position never depends on
later tokens, so the embedding is the same either way; the second pass keeps the exported embedding
model's tokenisation untouched (no targets at inference time).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from recforge.config import RecforgeError

from .align_config import GenerationLossConfig

TASK_PHRASE = {"hashtags": "Hashtags", "category": "Category"}


# ---------------------------------------------------------------- generation targets


def targets_from_pairs(pairs: list[dict], max_hashtags: int) -> dict[str, dict]:
    """item id -> {"hashtags": [...]} from `item_tag` rows (anchor = item, positive = one of its tags).

    Only the given (training) rows are read, so held-out pairs never leak into the targets."""
    tags: dict[str, list[str]] = {}
    for p in pairs:
        if p.get("kind") != "item_tag":
            continue
        known = [str(t) for t in (p.get("anchor_positive_ids") or [])] or [str(p["positive"])]
        have = tags.setdefault(str(p["anchor_id"]), [])
        for t in known:
            if t not in have:
                have.append(t)
    return {i: {"hashtags": t[:max_hashtags], "category": None} for i, t in tags.items() if t}


def _tag_name(value, key: str) -> str | None:
    if isinstance(value, dict):
        value = value.get(key)
    return str(value).strip() if value not in (None, "") else None


def targets_from_file(cfg: GenerationLossConfig, rejects=None) -> dict[str, dict]:
    """item id -> {"hashtags", "category"} from a JSONL/Parquet catalogue (e.g. goodbooks books_tags.jsonl.gz)."""
    from recforge.io import parquet_files, resolve_path
    from recforge.readers import FileKey, RejectLog, SourceConfig, read_records

    key = FileKey("loss.generation.targets_path")
    path = resolve_path(cfg.targets_path)
    # a Parquet folder is read shard by shard; each file goes through the quarantining reader
    files = parquet_files(path, key) if path.is_dir() else [path]
    kinds = {cfg.hashtags_field: "list"} if cfg.hashtags_field else {}
    rows = [r for f in files for r in read_records(SourceConfig(path=str(f), id=cfg.id_field), rejects or RejectLog(), key, kinds)]
    exclude = set(cfg.exclude_tags)
    out = {}
    for item_id, row in rows:
        raw_tags = row.get(cfg.hashtags_field) if cfg.hashtags_field else None
        tags = [t for t in (_tag_name(v, cfg.tag_name_key) for v in (raw_tags or [])) if t and t not in exclude]
        category = _tag_name(row.get(cfg.category_field), cfg.tag_name_key) if cfg.category_field else None
        if tags or category:
            out[item_id] = {"hashtags": tags[: cfg.max_hashtags], "category": category}
    return out


def generation_examples(pairs: list[dict], targets: dict[str, dict], cfg: GenerationLossConfig,
                        query_prompt: str | None, document_prompt: str | None) -> list[dict | None]:
    """Per training row: the item text to describe and its target, or None when neither item has targets.

    The row's positive item is preferred (it carries the document prompt), else its anchor (item -> item,
    item -> tag). The task is hashtags for a `hashtag_share` of rows (by a hash of pair_id, so runs are
    reproducible), category otherwise; an item missing the drawn field uses the other one."""
    out: list[dict | None] = []
    for p in pairs:
        chosen = None
        # Only sides that are items by the pair kind (`<anchor>_<positive>`): user and book ids may both be numbers.
        kind = str(p.get("kind") or "query_item")
        sides = [("positive_id", "positive", document_prompt)] if kind.endswith("item") else []
        sides += [("anchor_id", "anchor", query_prompt)] if kind.startswith("item") else []
        for id_key, text_key, prompt in sides:
            t = targets.get(str(p.get(id_key)))
            if t:
                chosen = (t, (prompt or "") + str(p[text_key]))
                break
        if chosen is None:
            out.append(None)
            continue
        t, text = chosen
        draw = int(hashlib.sha256(str(p.get("pair_id")).encode()).hexdigest()[:8], 16) % 1000 / 1000
        task = "hashtags" if draw < cfg.hashtag_share else "category"
        if task == "hashtags" and not t["hashtags"]:
            task = "category"
        if task == "category" and not t["category"]:
            task = "hashtags"
        target = ", ".join(t["hashtags"]) if task == "hashtags" else t["category"]
        out.append({"text": text, "task": task, "target": target})
    return out


# ---------------------------------------------------------------- LM head


def load_lm_head(backbone_path: Path, model) -> nn.Linear:
    """The backbone's output projection (`lm_head.weight` from its safetensors), or a copy of the input
    embeddings when the checkpoint ties them. sentence-transformers loads the headless model, so the head is
    read here; it is owned by the loss, trained with it, and never exported (the embedding model needs no head)."""
    from safetensors import safe_open

    embeddings = model[0].auto_model.get_input_embeddings().weight
    weight = None
    for f in sorted(Path(backbone_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            key = next((k for k in st.keys() if k.endswith("lm_head.weight")), None)
            if key:
                weight = st.get_tensor(key)
                break
    if weight is None:
        weight = embeddings.detach().clone()  # tied checkpoint (no lm_head.weight stored)
    if weight.shape != embeddings.shape:
        raise RecforgeError(f"{backbone_path}: lm_head {tuple(weight.shape)} does not match the input embeddings "
                            f"{tuple(embeddings.shape)} (vocabulary resized without the head?)")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = nn.Parameter(weight.to(embeddings.dtype))
    return head


# ---------------------------------------------------------------- the loss


class NoteLLMJointLoss(nn.Module):
    """(contrastive + α · generation) / (1 + α). With α = 0 it returns the contrastive loss unchanged.

    Returns a dict {"contrastive", "generation"} of the two weighted parts: sentence-transformers sums them
    for backprop and logs each (as `contrastive` / `generation` in the trainer's log history)."""

    def __init__(self, model, contrastive: nn.Module, lm_head: nn.Linear, examples: list[dict | None],
                 alpha: float, max_target_tokens: int = 24):
        super().__init__()
        self.model = model
        self.contrastive = contrastive
        self.lm_head = lm_head
        self.examples = examples
        self.alpha = alpha
        self.max_target_tokens = max_target_tokens

    @property
    def transformer(self):
        # The trainer may swap in a wrapped (DDP) model: its first module is the sentence-transformers Transformer.
        return getattr(self.model, "module", self.model)[0]

    def batch_inputs(self, rows: list[int]) -> dict[str, Tensor] | None:
        """Token ids of `text (+ EOS or compression suffix) + " Hashtags: a, b</s>"`, labels only on the target."""
        tok = self.transformer.tokenizer
        max_len = self.transformer.max_seq_length
        seqs = []
        for r in rows:
            ex = self.examples[r]
            if ex is None:
                continue
            prefix = tok(ex["text"], add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
            phrase = tok(f" {TASK_PHRASE[ex['task']]}:", add_special_tokens=False)["input_ids"]
            target = tok(" " + ex["target"], add_special_tokens=False)["input_ids"][: self.max_target_tokens]
            target = target + [tok.eos_token_id]
            ids = prefix + phrase + target
            seqs.append((ids, [-100] * (len(prefix) + len(phrase)) + target))
        if not seqs:
            return None
        width = max(len(i) for i, _ in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for n, (ids, lab) in enumerate(seqs):  # right padding: positions start at 0 for every row
            input_ids[n, : len(ids)] = torch.tensor(ids)
            labels[n, : len(lab)] = torch.tensor(lab)
            mask[n, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def generation_loss(self, rows: list[int]) -> Tensor | None:
        """Mean token cross-entropy of the targets of these training rows (None if none of them has one)."""
        batch = self.batch_inputs(rows)
        if batch is None:
            return None
        device = self.lm_head.weight.device
        out = self.transformer.auto_model(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = self.lm_head(hidden[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                           batch["labels"][:, 1:].reshape(-1).to(device), ignore_index=-100)

    def forward(self, sentence_features, labels: Tensor):
        contrastive = self.contrastive(sentence_features, labels)
        if self.alpha == 0:
            return contrastive
        generation = self.generation_loss(labels.long().tolist())
        if generation is None:  # no row of this batch has a target: the batch is contrastive only
            generation = contrastive.new_zeros(())
        return {"contrastive": contrastive / (1 + self.alpha), "generation": self.alpha * generation / (1 + self.alpha)}

    def get_config_dict(self) -> dict:
        return {"alpha": self.alpha, "max_target_tokens": self.max_target_tokens,
                "examples_with_targets": sum(e is not None for e in self.examples)}


def probe_generation_loss(losses: list[NoteLLMJointLoss], n: int = 64) -> float | None:
    """Mean generation loss over the first `n` training rows with targets, no gradients (reported before/after)."""
    values = []
    for loss in losses:
        rows = [i for i, e in enumerate(loss.examples) if e is not None][:n]
        if rows:
            with torch.no_grad():
                values.append(float(loss.generation_loss(rows)))
    return sum(values) / len(values) if values else None


def describe_targets(targets: dict[str, dict]) -> str:
    return json.dumps({"items": len(targets), "with_category": sum(bool(t["category"]) for t in targets.values())})
