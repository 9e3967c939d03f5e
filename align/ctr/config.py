"""Config of the CTR bridge (`recforge eval ctr`) and of `recforge export-features`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from recforge.config import RecipeModel
from recforge.readers import SourceConfig
from recforge.splits import KAR_MAX_PROMPT_ITEMS, SplitRule


class CTRInputs(RecipeModel):
    interactions: SourceConfig
    items: SourceConfig
    users: SourceConfig | None = Field(default=None, description="optional user profiles (e.g. MovieLens demographics)")
    knowledge: str | None = Field(
        default=None, description="generate's features table (Parquet file or folder): knowledge text per item / user"
    )
    judgement: str | None = Field(
        default=None, description="a `recforge generate` run of a choice-constrained judgement (e.g. audience_reception): "
        "its outputs become the `item_judgement` input (the distribution over the choices)",
    )
    skip_if_missing: bool = Field(
        default=False, description="path-based datasets (MovieLens): skip with a clear reason when the files are absent"
    )


class LabelConfig(RecipeModel):
    positive_threshold: float = 4.0  # label >= threshold is a click (MovieLens / goodbooks: rating >= 4)


class GuardConfig(RecipeModel):
    """KAR leakage guard: per user the first min((n+1)//2, max_prompt_items) events only feed text features.

    One setting for the whole project (`recforge.splits.KAR_MAX_PROMPT_ITEMS`): generate's prompts use the same
    prefix, so a CTR recipe cannot move it without the knowledge it reads being built on another prefix."""

    max_prompt_items: int = KAR_MAX_PROMPT_ITEMS

    @model_validator(mode="after")
    def _one_guard(self):
        if self.max_prompt_items != KAR_MAX_PROMPT_ITEMS:
            raise ValueError(f"guard.max_prompt_items={self.max_prompt_items}: the KAR guard is one setting shared with "
                             f"generate (recforge.splits.KAR_MAX_PROMPT_ITEMS = {KAR_MAX_PROMPT_ITEMS})")
        return self


class TextConfig(RecipeModel):
    item_template: str = "{title}"
    user_template: str = "{profile}Recently rated: {history}"
    profile_template: str = ""  # e.g. "A {age}-year-old {gender} {occupation}. "
    history_item_template: str = "{title} ({rating:.0f} stars)"
    max_history_items: int = 30


class EmbeddingConfig(RecipeModel):
    model: str = Field(default="minilm", description="'minilm' (offline all-MiniLM-L6-v2), or any SentenceTransformer path")
    batch_size: int = 64
    normalize: bool = True
    max_seq_length: int | None = Field(default=None, description="truncate texts to this many tokens (None: the model's own)")


class LLMConfig(RecipeModel):
    """The causal LLM of `model.backbone: bahe` (BAHE, SIGIR 2024) and of its full-token baseline `llm_ctr`."""

    renamed_keys: ClassVar[dict[str, str]] = {"lr": "learning_rate"}

    model: str = Field(default="smollm2", description="alias (recforge.models.resolve_model) or a local HF causal-LM folder")
    lower_layers: int | None = Field(
        default=None, ge=1, description="k: the frozen layers that encode each distinct behaviour once (None: L // 2)"
    )
    pooling: Literal["mean"] = "mean"  # over a behaviour's tokens (BAHE's atomic encoding); the only one the paper names
    user_pooling: Literal["mean", "last"] = Field(
        default="mean", description="upper-layer outputs over the behaviours -> one user vector"
    )
    upper: Literal["lora", "full"] = Field(default="lora", description="how layers k+1..L train")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    learning_rate: float = Field(default=2e-4, description="learning rate of the LLM's trainable weights (the head keeps train.learning_rate)")
    behaviour_template: str = "{title}"  # one behaviour's text (an item title; a query in a search log)
    max_behaviour_tokens: int = Field(default=24, ge=1, description="a behaviour text is cut to this many tokens")
    history_separator: str = Field(default="; ", description="llm_ctr: the history's titles joined into one text")
    cache_dir: str | None = Field(default=None, description="the behaviour-vector table (default: <out_dir>/features/bahe_behaviours)")
    cache_batch_size: int = 64
    eval_batch_size: int = 256
    dtype: Literal["float32", "bfloat16"] = "float32"
    compare_llm_ctr: bool = Field(default=False, description="also train the full-token LLM-CTR baseline (slow: tokens x L layers)")


class LARRConfig(RecipeModel):
    """`model.scene: larr` (LARR, RecSys 2024): scene texts -> frozen encoder -> [AGG] encoder aligned to the ID space."""

    encoder: str = Field(
        default="smollm2",
        description="frozen (aligned) encoder: alias, a causal-LM folder (mean of its last layer), or a sentence-transformers export",
    )
    max_tokens: int = 32
    batch_size: int = 64
    cache_dir: str | None = Field(default=None, description="the scene-text table (default: <out_dir>/features/larr_scene)")
    profile_template: str | None = Field(default=None, description="user profile text, e.g. 'Age {age}, {gender}, {occupation}, zip {zip_prefix}'")
    time_template: str | None = Field(default=None, description="event time text from the timestamp: {hour}, {weekday} (None: no time feature)")
    item_template: str = "{title}"
    recent_items: int = Field(default=5, ge=0, description="the user's last n behaviours, each its own feature")
    zip_prefix_chars: int = 3
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    ff_dim: int = 128
    dropout: float = 0.1
    align_weight: float = Field(default=0.1, description="weight of the InfoNCE alignment loss")
    temperature: float = 0.1
    schedule: Literal["joint", "before"] = Field(
        default="joint",
        description="joint: BCE + w * InfoNCE each step; before: align to a trained IDs-only model's vectors first, then BCE",
    )
    align_epochs: int = Field(default=2, description="schedule=before: epochs of alignment before the CTR loss")
    detach_collaborative: bool = Field(default=True, description="the alignment moves the scene encoder, not the ID embeddings")
    variants: list[Literal["ids_only", "scene_concat", "larr", "larr_no_align"]] = Field(
        default_factory=lambda: ["ids_only", "scene_concat", "larr", "larr_no_align"]
    )


class ModelConfig(RecipeModel):
    backbone: Literal["din", "dcn", "bahe", "llm_ctr"] = "din"
    head: Literal["din", "dcn"] = Field(default="din", description="bahe / llm_ctr: the CTR head over IDs + the LLM vectors")
    scene: Literal["none", "larr"] = "none"
    embed_dim: int = 32
    history_length: int = 20
    adaptor_dim: int = 32  # KAR: one 32-d vector per augmented input
    expert_hidden: int = 128
    n_shared_experts: int = 2
    n_specific_experts: int = 2
    mlp_hidden: list[int] = Field(default_factory=lambda: [200, 80])
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer of the head")
    cross_layers: int = 2
    llm: LLMConfig = Field(default_factory=LLMConfig)
    larr: LARRConfig = Field(default_factory=LARRConfig)


class TrainConfig(RecipeModel):
    """The CTR models' training settings, under Hugging Face `TrainingArguments` names (the vocabulary of every stage)."""

    renamed_keys: ClassVar[dict[str, str]] = {"batch_size": "per_device_train_batch_size", "lr": "learning_rate",
                                              "max_epochs": "num_train_epochs", "patience": "early_stopping_patience"}
    per_device_train_batch_size: int = 2048
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    num_train_epochs: int = 10
    early_stopping_patience: int = 2
    num_threads: int | None = None
    max_train_samples: int | None = Field(default=None, description="train on a fixed random subsample (LLM backbones on few cores)")
    max_eval_samples: int | None = Field(default=None, description="validate / test on a fixed random subsample")


class NewItemsConfig(RecipeModel):
    """The new-item split: items held out by the project rule (`recforge.splits`, entity `item`,
    `split.eval_percent.item`) are never a training or validation target; test samples are then reported
    separately for warm targets and new targets."""

    enabled: bool = False
    history: Literal["keep", "remove"] = Field(
        default="keep",
        description="keep: a held-out item may still appear in training histories (how a new item enters logs); "
        "remove (strict): held-out items are dropped from every history",
    )


class TuningConfig(RecipeModel):
    """One fixed search budget, the same for every variant: `budget` settings drawn (seeded) from `space`,
    the recipe's own setting first; each is trained once (seed `seed`) and scored on the validation users."""

    budget: int = Field(default=1, ge=1, description="settings tried per variant (1: the recipe's setting only)")
    seed: int = 0
    space: dict[Literal["embed_dim", "dropout", "weight_decay", "learning_rate"], list[float]] = Field(
        default_factory=lambda: {"embed_dim": [16, 32, 64], "dropout": [0.0, 0.2, 0.5],
                                 "weight_decay": [1e-5, 1e-4, 1e-3], "learning_rate": [3e-4, 1e-3, 3e-3]}
    )


class FloorsConfig(RecipeModel):
    """Baselines every report carries: logistic regression on the DIN's inputs, and item popularity."""

    logistic: bool = True
    popularity: bool = True
    logistic_c: list[float] = Field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0],
                                    description="inverse regularisation strengths tried on the validation users")


class BootstrapConfig(RecipeModel):
    resamples: int = Field(default=1000, ge=10)
    seed: int = 0
    level: float = Field(default=0.95, gt=0, lt=1)


class CTRRecipe(RecipeModel):
    name: str
    out_dir: str = "runs/ctr"
    inputs: CTRInputs
    llm_embedding: EmbeddingConfig | None = Field(
        default=None, description="variant input `item_llm_embedding`: the item text encoded by this (aligned LLM) embedder"
    )
    labels: LabelConfig = Field(default_factory=LabelConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    # users, by the project rule (recforge/splits.py): test = the rule's held-out users (`split.eval_percent.user`,
    # the users data_recipes holds out); validation (early stopping) = the next `valid_percent` hash buckets
    split: SplitRule = Field(default_factory=SplitRule)
    valid_percent: int = Field(default=10, ge=0, le=100, description="validation users, in whole percent of all users")
    text: TextConfig = Field(default_factory=TextConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    new_items: NewItemsConfig = Field(default_factory=NewItemsConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    floors: FloorsConfig = Field(default_factory=FloorsConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    costs: dict[str, str] = Field(
        default_factory=dict,
        description="dense input -> the generate run folder that made its text (its manifest's time is the generation cost)",
    )
    # variant name -> dense inputs: item_text, user_text, item_knowledge, user_knowledge, item_judgement
    variants: dict[str, list[Literal["item_text", "user_text", "item_knowledge", "user_knowledge", "item_judgement", "item_llm_embedding"]]] = Field(
        default_factory=lambda: {
            "ids_only": [],
            "item_text": ["item_text"],
            "item_user_text": ["item_text", "user_text"],
            "knowledge": ["item_knowledge", "user_knowledge"],
        }
    )
    adaptors: list[Literal["kar", "mlp"]] = Field(default_factory=lambda: ["kar", "mlp"])

    @property
    def mode(self) -> str:
        """text (DIN / DCN with dense inputs), bahe (an LLM tower: bahe or llm_ctr) or larr (scene encoder)."""
        if self.model.backbone in ("bahe", "llm_ctr"):
            return "bahe"
        return "larr" if self.model.scene == "larr" else "text"

    @model_validator(mode="after")
    def _no_key_the_mode_ignores(self):
        """A key the recipe's mode never reads is refused by name (it used to be dropped without a word)."""
        ignored = [f"{k}" for k in sorted(self.model_fields_set & MODE_IGNORES[self.mode])]
        ignored += [f"model.{k}" for k in sorted(self.model.model_fields_set & MODEL_IGNORES[self.mode])]
        if self.mode == "bahe" and len(self.adaptors) > 1 and "adaptors" in self.model_fields_set:
            ignored.append(f"adaptors after the first ({self.adaptors[1:]})")
        if self.mode == "bahe" and self.model.scene != "none":
            ignored.append(f"model.scene: {self.model.scene}")
        if ignored:
            raise ValueError(f"{self.mode} mode (model.backbone: {self.model.backbone}, model.scene: {self.model.scene}) "
                             f"does not read: {', '.join(ignored)}; remove them, or choose the mode that uses them")
        return self

    @model_validator(mode="after")
    def _valid_band_fits(self):
        if self.split.eval_percent.user + self.valid_percent > 100:
            raise ValueError(f"split.eval_percent.user ({self.split.eval_percent.user}) + valid_percent "
                             f"({self.valid_percent}) is over 100")
        return self


# What each mode of `eval ctr` never reads (checked by CTRRecipe): the verdict machinery (text variants, tuning, floors,
# intervals, costs) is the text mode's; the LLM tower's settings are BAHE's; the scene encoder's are LARR's.
_VERDICT_KEYS = {"variants", "tuning", "floors", "bootstrap", "costs", "llm_embedding"}
MODE_IGNORES = {"text": set(), "bahe": _VERDICT_KEYS | {"text", "embedding"}, "larr": _VERDICT_KEYS | {"adaptors"}}
MODEL_IGNORES = {"text": {"llm", "larr", "head"}, "bahe": {"larr"}, "larr": {"llm", "head"}}


class ExportFeaturesRecipe(RecipeModel):
    """`recforge export-features`: texts of a catalogue (or a features table) -> a versioned vector table."""

    name: str
    entity: Literal["item", "user"] = "item"
    out_dir: str
    source: SourceConfig
    text_template: str = "{title}"
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
