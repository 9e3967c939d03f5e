"""Config of the CTR bridge (`recforge eval ctr`) and of `recforge export-features`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recforge.config import RecipeModel
from recforge.data_recipes.readers import SourceConfig


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


class SplitConfig(RecipeModel):
    test_fraction: float = 0.1  # users, by a salted hash of user_id (9:1)
    valid_fraction: float = 0.1  # of the training users, for early stopping
    salt: str = "recforge-ctr"


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


class ModelConfig(RecipeModel):
    backbone: Literal["din", "dcn"] = "din"
    embed_dim: int = 32
    history_length: int = 20
    adaptor_dim: int = 32  # KAR: one 32-d vector per augmented input
    expert_hidden: int = 128
    n_shared_experts: int = 2
    n_specific_experts: int = 2
    mlp_hidden: list[int] = Field(default_factory=lambda: [200, 80])
    cross_layers: int = 2


class TrainConfig(RecipeModel):
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 1e-5
    max_epochs: int = 10
    patience: int = 2
    num_threads: int | None = None


class CTRRecipe(RecipeModel):
    name: str
    out_dir: str = "runs/ctr"
    inputs: CTRInputs
    labels: LabelConfig = Field(default_factory=LabelConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
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


class ExportFeaturesRecipe(RecipeModel):
    """`recforge export-features`: texts of a catalogue (or a features table) -> a versioned vector table."""

    name: str
    entity: Literal["item", "user"] = "item"
    out_dir: str
    source: SourceConfig
    text_template: str = "{title}"
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
