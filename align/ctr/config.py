"""Config of the CTR bridge (`recforge eval ctr`) and of `recforge export-features`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recforge.config import RecipeModel
from recforge.data_recipes.readers import SourceConfig
from recforge.splits import SplitRule


class CTRInputs(RecipeModel):
    interactions: SourceConfig
    items: SourceConfig
    users: SourceConfig | None = Field(default=None, description="optional user profiles (e.g. MovieLens demographics)")
    knowledge: str | None = Field(
        default=None, description="generate's features table (Parquet file or folder): knowledge text per item / user"
    )
    skip_if_missing: bool = Field(
        default=False, description="path-based datasets (MovieLens): skip with a clear reason when the files are absent"
    )


class LabelConfig(RecipeModel):
    positive_threshold: float = 4.0  # label >= threshold is a click (MovieLens / goodbooks: rating >= 4)


class GuardConfig(RecipeModel):
    """KAR leakage guard: per user the first min((n+1)//2, max_prompt_items) events only feed text features."""

    max_prompt_items: int = 30


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
    lr: float = Field(default=2e-4, description="learning rate of the LLM's trainable weights (the head keeps train.lr)")
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
    cross_layers: int = 2
    llm: LLMConfig = Field(default_factory=LLMConfig)
    larr: LARRConfig = Field(default_factory=LARRConfig)


class TrainConfig(RecipeModel):
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 1e-5
    max_epochs: int = 10
    patience: int = 2
    num_threads: int | None = None
    max_train_samples: int | None = Field(default=None, description="train on a fixed random subsample (LLM backbones on few cores)")
    max_eval_samples: int | None = Field(default=None, description="validate / test on a fixed random subsample")


class CTRRecipe(RecipeModel):
    name: str
    out_dir: str = "runs/ctr"
    inputs: CTRInputs
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
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # variant name -> dense inputs: item_text, user_text, item_knowledge, user_knowledge
    variants: dict[str, list[Literal["item_text", "user_text", "item_knowledge", "user_knowledge"]]] = Field(
        default_factory=lambda: {
            "ids_only": [],
            "item_text": ["item_text"],
            "item_user_text": ["item_text", "user_text"],
            "knowledge": ["item_knowledge", "user_knowledge"],
        }
    )
    adaptors: list[Literal["kar", "mlp"]] = Field(default_factory=lambda: ["kar", "mlp"])

    @model_validator(mode="after")
    def _valid_band_fits(self):
        if self.split.eval_percent.user + self.valid_percent > 100:
            raise ValueError(f"split.eval_percent.user ({self.split.eval_percent.user}) + valid_percent "
                             f"({self.valid_percent}) is over 100")
        return self


class ExportFeaturesRecipe(RecipeModel):
    """`recforge export-features`: texts of a catalogue (or a features table) -> a versioned vector table."""

    name: str
    entity: Literal["item", "user"] = "item"
    out_dir: str
    source: SourceConfig
    text_template: str = "{title}"
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
