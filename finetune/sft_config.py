"""Config of `recforge sft`: chat-formatted supervised fine-tuning, loss on completions only (trl).

Tasks (one recipe each in `finetune/recipes/sft_*.yaml`):
- `relevance`: ESCI query + product title -> grade label (exact / substitute / complement / irrelevant);
  evaluated by accuracy and macro-F1 on held-out queries.
- `tags`: NoteLLM-style item -> hashtags: goodbooks book -> shelf tags (training books only; the held-out
  books are left for generate's evaluation of the resulting tagger).
- `distill`: knowledge distillation from generate's features table (`recforge.records.features_schema()`):
  item text -> the teacher's tags / summary / knowledge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recforge.config import RecipeModel
from recforge.splits import SplitRule

from .cpt_config import Count, LoraSettings, ModelSettings, Seed, TrainingSettings


class RelevanceData(RecipeModel):
    queries: str = "sample://esci_us_titles/queries.jsonl.gz"
    items: str = "sample://esci_us_titles/products.jsonl.gz"
    judgments: str = "sample://esci_us_titles/judgments.jsonl.gz"
    labels: dict[int, str] = Field(default_factory=lambda: {3: "exact", 2: "substitute", 1: "complement", 0: "irrelevant"})


class TagsData(RecipeModel):
    books: str = "sample://goodbooks_10k_book_tags/books_tags.jsonl.gz"
    n_tags: Count = 5
    # targets = the book's shelves after generate's reader-shelf rule (normalised; what `recforge eval tags`
    # scores), then minus skip_tags; false: raw shelf names minus skip_tags only
    reader_shelf_rule: bool = True
    # order of a book's n_tags targets. count: its most used shelf first. frequency: the same tags in one global
    # order (most common across training books first): a small model then never goes back in the order, so
    # greedy decoding does not repeat a tag (with `count` the tiny model says "fiction, fiction, ...").
    order: Literal["count", "frequency"] = "frequency"
    # pick the n_tags targets among the book's `from_top` most used shelves (in `order`; with frequency: its most
    # typical ones, which a small model can learn to predict; 10 = the shelves eval tags counts as true); None: its
    # n_tags most used shelves
    from_top: int | None = Field(10, ge=1)
    # shelves that say nothing about the book (reading status, ownership)
    skip_tags: list[str] = Field(default_factory=lambda: [
        "to-read", "currently-reading", "favorites", "favourites", "owned", "books-i-own", "owned-books",
        "my-books", "library", "default", "my-library", "to-buy", "read", "kindle", "ebook", "audiobook", "i-own",
        "own", "books", "wish-list", "re-read", "ebooks", "audiobooks", "favorite", "all-time-favorites"])


class DistillData(RecipeModel):
    features: str  # Parquet in features_schema (generate's export)
    items: str  # JSONL/Parquet of the items: id + text fields
    item_id_field: str = "item_id"
    text_fields: list[str] = Field(default_factory=lambda: ["title"])
    target: Literal["tags", "summary", "knowledge", "pseudo_queries"] = "tags"
    entity: Literal["item", "book"] = "item"  # the split entity of the items' ids (`book` for goodbooks)


class SFTConfig(RecipeModel):
    task: Literal["relevance", "tags", "distill"]
    model: ModelSettings
    mode: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    relevance: RelevanceData = Field(default_factory=RelevanceData)
    tags: TagsData = Field(default_factory=TagsData)
    distill: DistillData | None = None
    # held-out queries / books / items: the project rule (recforge/splits.py), the same ids every stage holds out
    split: SplitRule = Field(default_factory=SplitRule)
    max_train_examples: Count | None = None
    max_eval_examples: Count | None = 200
    max_length: int = Field(256, ge=8)
    max_new_tokens: Count = 24
    # also write `out_dir/merged/` (full model, base dtype, logit parity checked): what generate / vLLM load
    merge: bool = False
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    seed: Seed = 0
    out_dir: str = "runs/sft/esci_relevance"
