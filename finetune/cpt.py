"""`recforge cpt`: continual pre-training of a causal LM on corpus Parquet (full, LoRA or QLoRA).

Built on the transformers `Trainer`, not trl: CPT is plain next-token training on our own packed
rows, and the Trainer gives checkpoint/resume (RNG + data order), accelerate/DeepSpeed/FSDP scale-out
and per-source evaluation (`eval_dataset` as a dict) as they are. trl's SFTTrainer packing works on a
text column and cannot express a corpus row's document groups (`connected`), so it adds nothing here.

Outputs in `out_dir`: `model/` (full model or adapter, with the tokenizer), `checkpoints/`,
`report.json` + `loss.png` + `perplexity.png` (forgetting report), `resolved_config.yaml`, `manifest.json`.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from recforge.config import RecforgeError
from recforge.io import atomic_write_json
from recforge.manifest import RunRecorder
from recforge.runstate import output_lock

from .chunked_loss import chunked_loss_trainer_class
from .corpus import check_finished, corpus_files, read_corpus, weighted_rows
from .cpt_config import CPTConfig
from .packing import BatchTrace, build_dataset, make_collator, row_segments
from .tokens import add_special_tokens, collect_tokens, save_token_info, trainable_token_modules

EVAL_BEFORE_FILE = "eval_before.json"


# ---------------------------------------------------------------------------- model


def check_qlora_supported(device: str) -> None:
    """Fail before loading any weights when 4-bit NF4 cannot run here, naming the alternative."""
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as err:  # bitsandbytes raises RuntimeError/OSError on broken installs
        raise RecforgeError(f"mode: qlora needs bitsandbytes, which failed to import ({err}); use mode: lora") from None
    try:
        probe = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:
        raise RecforgeError(
            f"mode: qlora (bitsandbytes 4-bit NF4) is not supported on device {device!r} here ({type(err).__name__}: {err}); "
            "use mode: lora (same adapter, unquantised base) or run on a CUDA GPU"
        ) from None


def resolve_attn_implementation(requested: str) -> str:
    """flash_attention_2 when the flash-attn package is installed (and CUDA is there), else sdpa with a warning:
    GPU recipes ask for it, and the same recipe must still run where it is missing. Packing is isolated on both
    paths (position ids restart per document)."""
    import importlib.util
    import warnings

    import torch

    if requested.startswith("flash_attention") and (
        importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()
    ):
        warnings.warn(f"model.attn_implementation={requested} needs flash-attn on CUDA; using sdpa instead", stacklevel=2)
        return "sdpa"
    return requested


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model_and_tokenizer(cfg: CPTConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = cfg.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=torch_dtype(m.dtype))
    if m.attn_implementation:
        kwargs["attn_implementation"] = resolve_attn_implementation(m.attn_implementation)
    if cfg.mode == "qlora":
        check_qlora_supported(device)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.lora.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, cfg.lora.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=True,
        )
    from recforge.models import resolve_model

    from recforge.models import check_model_folder

    path = resolve_model(m.path)  # an offline alias (smollm2, qwen2.5-0.5b) -> its converted folder
    check_model_folder(path, "model.path", m.trust_remote_code)  # finished run, safetensors only, no folder code
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as err:
        raise RecforgeError(f"model.path {m.path!r}: cannot load ({err})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from segments, never from pad ids
    model.config.use_cache = False  # a cache disables packed-sequence masking and wastes memory in training
    return model, tokenizer


def apply_lora(model, cfg: CPTConfig, token_ids: list[int]):
    """Wrap in a peft LoRA adapter; added-token rows of the embedding and lm_head stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    trainable_tokens = None
    if token_ids:
        # peft's TrainableTokens: only these rows train (and are saved), in the input embedding and the untied lm_head
        trainable_tokens = {name: list(token_ids) for name in trainable_token_modules(model)}
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# ---------------------------------------------------------------------------- data


def build_train_dataset(cfg: CPTConfig, tokenizer, run: RunRecorder | None, allow_partial: bool = False):
    rng = random.Random(cfg.seed)
    segments: list[list[int]] = []
    for name, src in cfg.data.train.items():
        rows = read_corpus(src.path, src.split, src.max_rows, allow_partial)
        if run is not None:
            run.add_input(src.path, name=name, rows=len(rows))
        for row in weighted_rows(rows, src.weight, rng):
            segments += row_segments(tokenizer, row["documents"], cfg.packing, cfg.max_length)
    return build_dataset(segments, cfg.packing, cfg.max_length)


_MARKUP = re.compile(r"<\|([A-Za-z0-9_]+)\|>")


def strip_markup(document: str) -> str:
    """`<|title|>Dune<|endofpiece|><|authors|>Frank Herbert<|endofpiece|>` -> `Dune\nFrank Herbert`."""
    text = _MARKUP.sub(lambda m: "\n" if m.group(1).startswith("end") else "", document)
    return text.strip()


def build_eval_datasets(cfg: CPTConfig, tokenizer, run: RunRecorder | None, allow_partial: bool = False) -> dict:
    """One dataset per eval source, documents isolated (per-document perplexity, whatever the training mode)."""
    out = {}
    for name, src in cfg.data.eval.items():
        rows = read_corpus(src.path, src.split, src.max_rows, allow_partial)
        if run is not None:
            run.add_input(src.path, name=f"eval:{name}", rows=len(rows))
        docs = [[strip_markup(d) for d in row["documents"]] if src.strip_markup else row["documents"] for row in rows]
        segs = [s for row_docs in docs for s in row_segments(tokenizer, row_docs, "isolated", cfg.max_length)]
        out[name] = build_dataset(segs, "isolated", cfg.max_length)
    return out


# ---------------------------------------------------------------------------- trainer


def cpu_only() -> bool:
    """No CUDA device: the Trainer must be told use_cpu, or several processes (torchrun / accelerate) each
    silently train alone on the full data, and bf16 autocast on CPU (AMX) is refused as 'bf16/gpu'."""
    import torch

    return not torch.cuda.is_available()


def training_arguments(cfg: CPTConfig, out_dir: Path, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.training
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,  # our rows carry `segments`, which the collator turns into model inputs
        prediction_loss_only=True,  # eval needs the loss only; keeping logits would cost vocab x tokens memory
        report_to=t.report_to or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        use_cpu=cpu_only(),
    )


def make_trainer(cfg: CPTConfig, out_dir: Path, run: RunRecorder | None = None, allow_partial: bool = False):
    """Model (+ added tokens, + LoRA), datasets, collator and Trainer, ready for `.train()`."""
    from transformers import Trainer

    # TrainingArguments first: under DeepSpeed ZeRO-3 it registers the config that makes from_pretrained partition
    # the weights while loading (zero3_init_flag); built after the model, the flag could not act
    args = training_arguments(cfg, out_dir, bool(cfg.data.eval))
    model, tokenizer = load_model_and_tokenizer(cfg)
    tokens = collect_tokens(cfg.tokens.add, cfg.tokens.from_manifest)
    token_ids = add_special_tokens(model, tokenizer, tokens, cfg.tokens.init, cfg.tokens.descriptions)
    if cfg.mode in ("lora", "qlora"):
        model = apply_lora(model, cfg, token_ids)
    train_ds = build_train_dataset(cfg, tokenizer, run, allow_partial)
    eval_ds = build_eval_datasets(cfg, tokenizer, run, allow_partial)
    collator = make_collator(cfg.packing, tokenizer.pad_token_id)
    if cfg.training.trace_batches:
        collator = BatchTrace(collator, out_dir / f"batches.rank{args.process_index}.jsonl")
    trainer_class = chunked_loss_trainer_class() if cfg.training.chunked_loss else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds or None,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.recforge_info = {"added_tokens": tokens, "added_token_ids": token_ids, "train_tokens": train_ds.n_tokens(),
                             "train_examples": len(train_ds)}
    return trainer


def eval_metrics(trainer) -> dict[str, dict[str, float]]:
    """{source: {loss, perplexity}} from one evaluation pass over every eval source."""
    if not trainer.eval_dataset:
        return {}
    raw = trainer.evaluate()
    out = {}
    for name in trainer.eval_dataset:
        loss = float(raw[f"eval_{name}_loss"])
        out[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return out


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest *complete* checkpoint: the Trainer writes `trainer_state.json` last, so a folder
    without it was cut short by a kill and is skipped (get_last_checkpoint would pick it)."""
    ckpt = out_dir / "checkpoints"
    if not ckpt.is_dir():
        return None
    done = [p for p in ckpt.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def resume_checkpoint(out_dir: Path, resume: bool) -> str | None:
    """The checkpoint `--resume` continues from (None without it); none there is an error."""
    checkpoint = last_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise RecforgeError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    return checkpoint


def check_corpora(cfg: CPTConfig, allow_partial: bool) -> list[str]:
    """The cheap checks, before the model loads and before the run writes anything: every corpus exists, holds the
    corpus columns and comes from a finished run, and a `tokens.from_manifest` run finished. Returns the
    `--allow-partial` notes of unfinished corpora read anyway (for the manifest)."""
    notes = []
    for path in dict.fromkeys(src.path for src in [*cfg.data.train.values(), *cfg.data.eval.values()]):
        note = check_finished(path, allow_partial)
        notes += [note] if note else []
        corpus_files(path, allow_partial=True)  # finished (or allowed) just above
    collect_tokens(cfg.tokens.add, cfg.tokens.from_manifest)
    return notes


def run_cpt(cfg: CPTConfig, resume: bool = False, allow_partial: bool = False) -> dict:
    """Train, evaluate before/after, save model + tokenizer + report. Returns the report dict.

    Holds the writer lock of `out_dir` for the whole run; the recorder (the `running` manifest) comes after the
    checks, so a refused run leaves the folder's previous run as it was."""
    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "cpt"):
        checkpoint = resume_checkpoint(out_dir, resume)
        partial = check_corpora(cfg, allow_partial)
        run = RunRecorder(out_dir, "cpt", cfg, cfg.seed)
        if partial:
            run.extra["allow_partial"] = partial
        return _train(cfg, out_dir, checkpoint, run, allow_partial)


def _train(cfg: CPTConfig, out_dir: Path, checkpoint: str | None, run: RunRecorder, allow_partial: bool) -> dict:
    from transformers import set_seed

    from .forgetting import write_forgetting_report

    set_seed(cfg.seed)
    trainer = make_trainer(cfg, out_dir, run, allow_partial)
    main = trainer.is_world_process_zero()

    before_path = out_dir / EVAL_BEFORE_FILE
    if checkpoint and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = eval_metrics(trainer)
        if main:
            atomic_write_json(before_path, before)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    after = eval_metrics(trainer)

    model_dir = out_dir / "model"
    trainer.save_model(str(model_dir))  # adapter (peft) or full model, safetensors; rank 0 only
    report = {}
    if main:
        # the Trainer also drops a pickled training_args.bin there: the published folder stays pickle-free
        # (the settings are in resolved_config.yaml)
        (model_dir / "training_args.bin").unlink(missing_ok=True)
        trainer.processing_class.save_pretrained(str(model_dir))
        info = trainer.recforge_info
        save_token_info(model_dir, info["added_tokens"], info["added_token_ids"])
        report = write_forgetting_report(out_dir, before, after, trainer.state.log_history, cfg)
        run.add_output("model", model_dir, mode=cfg.mode)
        run.add_output("report", out_dir / "report.json")
        run.extra.update(
            {
                "train": {"steps": trainer.state.global_step, "train_loss": result.training_loss,
                          "train_tokens": info["train_tokens"], "train_examples": info["train_examples"],
                          "train_runtime_s": result.metrics.get("train_runtime"), "resumed_from": checkpoint},
                "added_tokens": info["added_tokens"],
                "eval_before": before,
                "eval_after": after,
            }
        )
        run.finish()
    return report
