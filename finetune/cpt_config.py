"""Config of `recforge cpt`: continual pre-training (full, LoRA or QLoRA) on corpus Parquet.

Every key is a recipe key (`finetune/recipes/cpt_*.yaml`) and can be overridden on the command line,
e.g. `recforge cpt finetune/recipes/cpt_esci_tiny.yaml data.train.esci.path=/other/corpus training.max_steps=50`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from recforge.config import TRAINING_ARGUMENTS_RENAMED, RecipeModel, WarmupSteps

# Bounds on every number a recipe sets (sft_config.py uses them too): a bad value fails at load with one line
# naming the key (exit 2), not deep inside the Trainer or, worse, as a run that silently trains on nothing.
Count = Annotated[int, Field(ge=1)]  # batch sizes, steps between logs / saves / evals, row caps
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # learning rate, num_train_epochs, source weights
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # weight decay, grad-norm clip (0 = off)
Seed = Annotated[int, Field(ge=0)]


class ModelSettings(RecipeModel):
    path: str  # local folder or hub id, loaded with from_pretrained
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: str | None = None  # None = transformers' default (sdpa); "flash_attention_2" on GPU
    trust_remote_code: bool = False  # never on unless the user says so
    gradient_checkpointing: bool = False


class LoraSettings(RecipeModel):
    r: Count = 16
    alpha: Count = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" = every linear layer but lm_head (peft's shortcut); or a list such as [q_proj, v_proj]
    target_modules: list[str] | str = "all-linear"
    # 4-bit settings, used when mode is qlora
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SourceSettings(RecipeModel):
    """One corpus in the training mix (a Parquet file or a folder of Parquet shards in corpus_schema)."""

    path: str
    split: str | None = "train"  # keep rows whose `split` equals this (None = all rows)
    # rows per epoch = weight x rows in the file: 2.0 repeats the source twice, 0.25 keeps a random quarter
    weight: Rate = 1.0
    max_rows: Count | None = None


class EvalSourceSettings(RecipeModel):
    """A held-out text set whose loss and perplexity are tracked before, during and after training."""

    path: str
    # held-out rows only (a row without a split value is refused, never scored as held out); None = all rows,
    # for a corpus that is held out as a whole
    split: str | None = "eval"
    max_rows: Count | None = 500
    # score the documents with their field markup (`<|title|>`, `<|endofpiece|>`...) removed, a closing piece
    # becoming a line break: the perplexity of the domain text itself, which a base model that never saw the
    # markup can be compared on fairly (with markup, much of the "before -> after" gain is learning the tags)
    strip_markup: bool = False


class DataSettings(RecipeModel):
    """Sources by name, so any path is overridable: `data.train.esci.path=/other/corpus`."""

    train: dict[str, SourceSettings]
    eval: dict[str, EvalSourceSettings] = Field(default_factory=dict)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _drop_nulled_sources(cls, sources):
        """`data.train.replay=null` on the command line removes that source (a recipe's ablation arm)."""
        if isinstance(sources, dict):
            return {name: src for name, src in sources.items() if src is not None}
        return sources


class TokenSettings(RecipeModel):
    """Added special tokens (e.g. CPRM's `<|startofpiece|>` field pieces)."""

    add: list[str] = Field(default_factory=list)
    # also add the `special_tokens` listed in this data manifest.json (a data_recipes run's manifest)
    from_manifest: str | None = None
    # how new embedding / lm_head rows start: the mean of the existing rows, or the mean of the rows of
    # the token's own description text (`descriptions[token]`, falls back to mean)
    init: Literal["mean", "description"] = "mean"
    descriptions: dict[str, str] = Field(default_factory=dict)


class TrainingSettings(RecipeModel):
    """The `training:` keys of CPT and SFT, under Hugging Face `TrainingArguments`' names (passed on as such)."""

    renamed_keys = TRAINING_ARGUMENTS_RENAMED  # an old key (`epochs`...) fails with one line naming the new one

    max_steps: int = Field(-1, ge=-1)  # > 0 overrides num_train_epochs
    num_train_epochs: Rate = 1.0
    per_device_train_batch_size: Count = 8  # also per_device_eval_batch_size (the held-out loss)
    gradient_accumulation_steps: Count = 1
    learning_rate: Rate = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: WarmupSteps = 0  # int >= 1 = steps, float in [0, 1) = ratio of total steps
    weight_decay: NonNegative = 0.0
    max_grad_norm: NonNegative = 1.0
    logging_steps: Count = 10
    save_steps: Count = 500
    save_total_limit: Count | None = 2
    bf16: bool = False
    report_to: list[str] = Field(default_factory=list)  # e.g. [wandb]; nothing by default


class CPTTrainingSettings(TrainingSettings):
    eval_steps: Count | None = None  # None = evaluate only before and after
    # lm_head + cross-entropy chunk by chunk, never the full [tokens x vocab] logits (finetune/chunked_loss.py);
    # the same loss and gradients; llama / mistral / qwen2 / qwen3 heads, single process (else the stock loss)
    chunked_loss: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    # diagnostics: write out_dir/batches.rank<R>.jsonl, the row fingerprints each rank trained on per step
    # (check data sharding across processes, or data order after a resume)
    trace_batches: bool = False


class CPTConfig(RecipeModel):
    model: ModelSettings
    mode: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings
    packing: Literal["isolated", "connected", "off"] = "isolated"
    max_length: int = Field(512, ge=8)
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    training: CPTTrainingSettings = Field(default_factory=CPTTrainingSettings)
    seed: Seed = 0
    out_dir: str = "runs/cpt/esci"
