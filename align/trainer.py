"""`recforge align RECIPE`: contrastive alignment with sentence-transformers' trainer, export, evaluation.

Steps: pairs -> model (backbone + pooling) -> untuned metrics -> SentenceTransformerTrainer -> export
(LoRA merged) -> reload check (left/right padding) -> tuned metrics -> report + manifest.

Under `accelerate launch` / `torchrun` every rank trains on its shard of the pairs; the base and tuned
evaluation, the export and every file are the main process's (`recforge.distributed`): the other ranks
wait for it and return its result.
"""

from __future__ import annotations

import logging

import numpy as np
from pathlib import Path

from recforge.config import RecforgeError
from recforge.distributed import from_main
from recforge.io import atomic_write_json, atomic_write_text, write_parquet_atomic
from recforge.manifest import RunRecorder

from .align_config import AlignConfig
from .embed import resolve_device
from .evaluate import evaluate_model, write_report
from .export import check_export, encode_both_paddings, export_model, model_card
from .generation_loss import probe_generation_loss
from .losses import WeightedLoss, build_loss
from .pairs import load_for_run, pairs_table

log = logging.getLogger("recforge.align")


def prompts_of(cfg: AlignConfig) -> dict[str, str]:
    prompts = {}
    if cfg.data.query_prompt:
        prompts["query"] = cfg.data.query_prompt
    if cfg.data.document_prompt:
        prompts["document"] = cfg.data.document_prompt
    return prompts


def fill_negatives(pairs: list[dict]) -> list[dict]:
    """Every row needs the same columns: rows without a hard negative borrow another row's negative,
    skipping any that is a known positive (or the same item) of this anchor."""
    pool = [(p["negative_id"], p["negative"]) for p in pairs if p.get("negative")]
    if not pool:
        return pairs
    out = []
    for i, p in enumerate(pairs):
        if not p.get("negative"):
            known = {str(x) for x in [p["positive_id"], *(p.get("anchor_positive_ids") or [])]}
            for step in range(len(pool)):
                nid, ntext = pool[(i + step) % len(pool)]
                if str(nid) not in known:
                    p = {**p, "negative_id": nid, "negative": ntext}
                    break
        out.append(p)
    return out


def training_dataset(pairs: list[dict], use_negatives: bool):
    from datasets import Dataset

    columns = {"anchor": [p["anchor"] for p in pairs], "positive": [p["positive"] for p in pairs]}
    if use_negatives and all(p.get("negative") for p in pairs):
        columns["negative"] = [p["negative"] for p in pairs]
    columns["label"] = list(range(len(pairs)))  # row index: lets InfoNCELoss look up ids for masking
    return Dataset.from_dict(columns)


def add_generation_loss(model, parts: dict, cfg: AlignConfig, info: dict | None, all_pairs: list[dict]):
    """Wrap each kind's contrastive loss (`parts[name] = (loss, that kind's pairs)`) in NoteLLM's joint loss,
    one LM head shared by all kinds. Targets from pairs use every training pair (item_tag rows of any kind)."""
    from .generation_loss import (NoteLLMJointLoss, generation_examples, load_lm_head, targets_from_file,
                                  targets_from_pairs)

    gen = cfg.loss.generation
    if not info or info.get("kind") != "causal_lm":
        raise RecforgeError("loss.generation_weight > 0 needs a causal-LM backbone (the generation term uses its LM head)")
    targets = targets_from_file(gen) if gen.targets_path else targets_from_pairs(all_pairs, gen.max_hashtags)
    if not targets:
        raise RecforgeError("loss.generation_weight > 0 but no generation targets: the training pairs have no item_tag rows; "
                            "set loss.generation.targets_path to a catalogue with tags / a category")
    head = load_lm_head(Path(info["backbone_path"]), model)
    if cfg.backbone.lora:
        head.weight.requires_grad_(False)  # LoRA trains adapters only, like the rest of the backbone
    wrapped = {}
    for name, (part, kind_pairs) in parts.items():
        examples = generation_examples(kind_pairs, targets, gen, cfg.data.query_prompt, cfg.data.document_prompt)
        inner = part.loss if isinstance(part, WeightedLoss) else part
        joint = NoteLLMJointLoss(model, inner, head, examples, cfg.loss.generation_weight, gen.max_target_tokens)
        wrapped[name] = WeightedLoss(joint, part.weight) if isinstance(part, WeightedLoss) else joint
    return wrapped, len(targets)


def train_model(model, pairs: list[dict], cfg: AlignConfig, out_dir: Path, info: dict | None = None,
                device: str = "cpu") -> dict:
    """Run SentenceTransformerTrainer on the pairs (on `device`); returns the training log summary."""
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    use_negatives = cfg.loss.use_hard_negatives
    by_kind: dict[str, list[dict]] = {}
    for p in pairs:
        by_kind.setdefault(p.get("kind") or "pair", []).append(p)
    if use_negatives:
        by_kind = {k: fill_negatives(v) for k, v in by_kind.items()}
    if len(by_kind) == 1:
        kind_pairs = next(iter(by_kind.values()))
        dataset = training_dataset(kind_pairs, use_negatives)
        loss = build_loss(cfg.loss, model, kind_pairs)
    else:
        # LARR: one InfoNCE term per pair kind (user<->user, item<->item, user<->item, ...), each weighted.
        # sentence-transformers trains a dict of datasets with a dict of losses, one kind per batch, so
        # the weighted sum is taken in expectation over batches (proportional sampling).
        dataset = {k: training_dataset(v, use_negatives) for k, v in sorted(by_kind.items())}
        loss = {k: WeightedLoss(build_loss(cfg.loss, model, v), cfg.loss.kind_weights.get(k, 1.0))
                for k, v in sorted(by_kind.items())}
    generation = {}
    if cfg.loss.generation_weight > 0:
        parts = loss if isinstance(loss, dict) else {"all": loss}
        kind_pairs = by_kind if isinstance(loss, dict) else {"all": next(iter(by_kind.values()))}
        wrapped, n_targets = add_generation_loss(model, {k: (parts[k], kind_pairs[k]) for k in parts}, cfg, info, pairs)
        loss = wrapped if isinstance(loss, dict) else wrapped["all"]
        joint = [getattr(p, "loss", p) for p in wrapped.values()]
        generation = {"generation_items_with_targets": n_targets,
                      "generation_rows_with_targets": sum(sum(e is not None for e in j.examples) for j in joint),
                      "generation_loss_before": probe_generation_loss(joint)}
    column_prompts = {}
    if cfg.data.query_prompt:
        column_prompts["anchor"] = cfg.data.query_prompt
    if cfg.data.document_prompt:
        column_prompts.update(positive=cfg.data.document_prompt, negative=cfg.data.document_prompt)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        learning_rate=cfg.train.learning_rate,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES if cfg.train.no_duplicates_sampler else BatchSamplers.BATCH_SAMPLER,
        prompts=column_prompts or None,
        save_strategy="no",
        report_to="none",
        logging_steps=cfg.train.logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",  # else the Trainer moves the model to CUDA whenever one is present
        bf16=cfg.train.bf16,
        gradient_checkpointing=cfg.backbone.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.backbone.gradient_checkpointing else None,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    if generation:
        generation["generation_loss_after"] = probe_generation_loss(joint)
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
               "first_logged_loss": history[0]["loss"] if history else None,
               "last_logged_loss": history[-1]["loss"] if history else None,
               "train_rows": sum(len(d) for d in dataset.values()) if isinstance(dataset, dict) else len(dataset),
               "kinds": {k: len(v) for k, v in by_kind.items()}, "world_size": args.world_size,
               "global_batch_size": cfg.train.per_device_train_batch_size * args.world_size, **generation}
    for name, part in (loss.items() if isinstance(loss, dict) else [("all", loss)]):
        inner = getattr(part, "loss", part)
        inner = getattr(inner, "contrastive", inner)
        if getattr(inner, "log_scale", None) is not None:
            summary[f"final_temperature_{name}"] = float(1.0 / inner.scale)
    return summary


def wrap_lora(model, cfg: AlignConfig) -> None:
    """Wrap the transformer in a peft LoRA adapter (merged again at export)."""
    from peft import LoraConfig, get_peft_model

    transformer = model[0]
    lora = LoraConfig(r=cfg.backbone.lora_r, lora_alpha=cfg.backbone.lora_alpha, lora_dropout=cfg.backbone.lora_dropout,
                      target_modules=cfg.backbone.lora_target_modules, bias="none")
    # `model`, not `auto_model`: in sentence-transformers 6 `auto_model` is a read-only property returning
    # `model`; assigning to it registered a second submodule while the exported one kept peft's wrapped layers
    transformer.model = get_peft_model(transformer.model, lora)


def probe_texts(task, n: int = 12) -> list[str]:
    """A few held-out queries and catalogue texts of mixed lengths, so batches really pad."""
    queries = list(task.queries.values())[:n]
    docs = sorted(task.corpus.values(), key=len)
    return queries + docs[:: max(1, len(docs) // n)][:n]


def run_align(cfg: AlignConfig) -> dict:
    import os
    import time

    import torch
    from transformers import set_seed

    from .pooling import build_embedding_model, resolve_backbone_path

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out_dir = Path(cfg.out_dir)
    run = RunRecorder(out_dir, "align", cfg, cfg.seed)
    set_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main = run.main  # rank 0 of a multi-process launch (or the only process): evaluates, exports, writes
    data = load_for_run(cfg.data, cfg.split, run)
    if main:
        write_parquet_atomic(pairs_table(data.train_pairs), out_dir / "train_pairs.parquet")
    run.add_output("train_pairs", out_dir / "train_pairs.parquet", rows=len(data.train_pairs))

    # Build the tiny LM first if it is not cached yet (that re-seeds torch), then seed: the projection's initial
    # weights, hence the "base" scores, are then the same whether or not the backbone had to be built.
    resolve_backbone_path(cfg.backbone.path, str(out_dir.parent))
    set_seed(cfg.seed)
    model, info = build_embedding_model(cfg.backbone, cfg.pooling, prompts_of(cfg), cache_root=str(out_dir.parent))
    info["lora"] = cfg.backbone.lora
    if cfg.loss.generation_weight > 0 and info["kind"] != "causal_lm":
        raise RecforgeError("loss.generation_weight > 0 needs a causal-LM backbone (the generation term uses its LM head); "
                            f"{info['backbone_path']} is an encoder")
    device = resolve_device(cfg.device)
    model.to(device)
    info["device"] = device
    results = {}
    if cfg.eval.compare_base and main:
        results["base"] = evaluate_model(model, data.task, cfg.eval.k_values, cfg.eval.batch_size)
        log.info("base: %s", results["base"])
    t_base = time.perf_counter()
    if cfg.backbone.lora:
        wrap_lora(model, cfg)
    if cfg.data.extra_pairs and not cfg.loss.use_pair_weights and any(e.weight != 1.0 for e in cfg.data.extra_pairs):
        log.warning("data.extra_pairs has weights but loss.use_pair_weights is false: the weights are ignored")
    summary = train_model(model, data.train_pairs, cfg, out_dir, info, device)
    t_train = time.perf_counter()
    summary["train_seconds"] = round(t_train - t_base, 1)
    if not main:
        return from_main(None)  # wait for rank 0's export, evaluation and files; return its result
    # with train.bf16 the Trainer's accelerate left model.forward wrapped in bf16 autocast; the export check
    # and evaluation must see the vectors the exported float32 folder gives (min cosine was 0.994 otherwise)
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.eval()

    texts = probe_texts(data.task)
    reference = encode_both_paddings(model, texts, "query" if cfg.data.query_prompt else None)
    export_dir = out_dir / "model"
    contract = export_model(model, export_dir, info, run.inputs)
    export_check = check_export(reference, export_dir, texts, "query" if cfg.data.query_prompt else None, device)
    # Kept so anyone can re-check the export later against the end-of-training vectors.
    np.savez(out_dir / "export_check_vectors.npz", right=reference["right"], left=reference["left"])
    atomic_write_json(out_dir / "export_check_texts.json",
                      {"texts": texts, "prompt_name": "query" if cfg.data.query_prompt else None})
    if min(export_check["min_cosine_right_padding"], export_check["min_cosine_left_padding"]) < 0.9999:
        raise RecforgeError(f"export check failed: reloaded vectors differ from training ({export_check})")

    from sentence_transformers import SentenceTransformer

    tuned = SentenceTransformer(str(export_dir), device=device)
    results["tuned"] = evaluate_model(tuned, data.task, cfg.eval.k_values, cfg.eval.batch_size)
    timing = {"total_seconds": round(time.perf_counter() - t_start, 1), "train_seconds": summary["train_seconds"],
              "base_eval_and_setup_seconds": round(t_base - t_start, 1), "torch_threads": torch.get_num_threads(),
              "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    report = write_report(results, out_dir / "eval", f"{data.task.name}: base vs tuned ({info['kind']}, {info['pooling']})",
                          {"seed": cfg.seed, "backbone": info, "train": summary, "timing": timing,
                           "data_notes": {k: v for k, v in data.notes.items() if k != "leakage"}})
    atomic_write_text(export_dir / "README.md", model_card(contract, {"table": report["table"]}))

    run.add_output("model", export_dir, embedding_dim=contract["dimension"])
    run.add_output("retrieval_metrics", report["json"])
    run.extra.update({"backbone": info, "train": summary, "export_check": export_check, "metrics": results,
                      "data_notes": data.notes, "timing": timing})
    run.finish()
    return from_main({"metrics": results, "table": report["table"], "export_dir": str(export_dir),
                      "export_check": export_check, "train": summary, "report": report})
