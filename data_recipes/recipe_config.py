"""The `recforge data` recipe: inputs, serializer, split, and one section per corpus.

Every key can be overridden from the command line, e.g.
`recforge data data_recipes/recipes/esci_search.yaml inputs.items.path=/data/products.parquet in_context.max_tokens=1024`.
A section with `enabled: false` (or whose inputs are missing) is skipped, and the manifest says why.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from recforge.config import RecipeModel
from recforge.readers import SourceConfig
from recforge.data_recipes.serialize import SerializerConfig, TokenCountConfig
from recforge.data_recipes.splits import SplitConfig

# Numbers a recipe sets are bounded where they are declared, so a bad value (`max_tokens.title=-5`, a negative
# weight, `nan`) fails at load with one line naming the key instead of emptying a corpus at exit 0.
Finite = Annotated[float, Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Inputs(RecipeModel):
    """The files a recipe reads; any of them may be absent (the sections that need it are skipped)."""

    items: SourceConfig | None = None
    queries: SourceConfig | None = None
    judgments: SourceConfig | None = None
    interactions: SourceConfig | None = None
    item_tags: SourceConfig | None = Field(
        default=None, description="per-item tags: id + fields.tags (a list of strings or of {tag_name, count})"
    )
    features: SourceConfig | None = Field(
        default=None, description="generated features per item (features_schema: entity_id, summary, pseudo_queries, knowledge)"
    )
    replay: SourceConfig | None = Field(default=None, description="general-text replay corpus: id + fields.text")


class ItemsCorpus(RecipeModel):
    enabled: bool = True


class QueriesCorpus(RecipeModel):
    enabled: bool = True


class QueryItemCorpus(RecipeModel):
    """A query followed by its positive items (grade >= min_grade), best first: CPRM joint pre-training."""

    enabled: bool = True
    min_grade: Finite = 2.0
    max_items: int = Field(default=8, ge=1)


class FieldTask(RecipeModel):
    name: str
    source: list[str]
    target: list[str]


class FieldTargetsCorpus(RecipeModel):
    """LARR-style field -> field rows: the source fields as the prompt, the target fields as what to write."""

    enabled: bool = False
    tasks: list[FieldTask] = Field(default_factory=list)


class InContextCorpus(RecipeModel):
    """CPRM in-context rows: related documents packed into one row up to max_tokens.

    Relations: `items_by_query` (items that share a positive query), `queries_by_item` (queries that
    share a positive item), `user_sequence` (one user's items in time order), `co_engaged_items` (an
    item followed by its top co-engaged items, NoteLLM scores from `pairs.item_item`).
    """

    enabled: bool = True
    relations: list[Literal["items_by_query", "queries_by_item", "user_sequence", "co_engaged_items"]] = Field(
        default_factory=lambda: ["items_by_query", "queries_by_item"]
    )
    max_tokens: int = Field(default=512, ge=1)
    min_docs: int = Field(default=2, ge=1, description="rows with fewer documents are dropped (nothing in context)")
    max_docs: int = Field(default=64, ge=1)
    max_group_size: int = Field(default=256, ge=2, description="largest group kept per key (most engaged first)")
    min_grade: Finite = Field(default=2.0, description="judgments at or above this grade count as positive")
    min_label: Finite | None = Field(default=None, description="interactions: keep events with label >= this")
    separator: str = "\n\n"
    chunk_rows: int = Field(default=2_000_000, ge=1000, description="group-bys run over at most this many events at a time")

    @model_validator(mode="after")
    def _docs_range(self):
        if self.min_docs > self.max_docs:
            raise ValueError(f"min_docs ({self.min_docs}) must be <= max_docs ({self.max_docs}): no row could be built")
        return self


class ReadingCorpus(RecipeModel):
    """CPRM reading comprehension: item text + its generated summary / pseudo-queries / knowledge."""

    enabled: bool = True
    parts: list[Literal["summary", "pseudo_queries", "knowledge", "tags"]] = Field(
        default_factory=lambda: ["summary", "pseudo_queries", "knowledge"]
    )
    separator: str = "\n"


class QueryItemPairs(RecipeModel):
    enabled: bool = True
    min_grade: Finite = 2.0
    hard_negatives: bool = True
    negative_max_grade: Finite = Field(default=0.0, description="judged items at or below this grade are hard negatives")


class ItemItemPairs(RecipeModel):
    """NoteLLM co-engagement: each user adds 1/(their distinct clicked items) to every co-occurring pair."""

    enabled: bool = True
    window: int | None = Field(default=None, ge=1, description="only pairs within this many positions; None = all")
    max_items_per_user: int = Field(default=200, ge=2, description="a user's most recent items considered")
    min_score: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    max_score: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    top_k: int = Field(default=10, ge=1)
    min_label: Finite | None = None

    @model_validator(mode="after")
    def _score_range(self):
        if self.min_score > self.max_score:
            raise ValueError(f"min_score ({self.min_score}) must be <= max_score ({self.max_score}): no pair could be kept")
        return self


class UserItemPairs(RecipeModel):
    """User history (their last `history_len` items) -> the next item."""

    enabled: bool = True
    history_len: int = Field(default=10, ge=1)
    min_history: int = Field(default=1, ge=1)
    max_pairs_per_user: int = Field(default=20, ge=1)
    history_field: str | None = Field(default="title", description="item field shown in the history (None = full text)")
    min_label: Finite | None = None


class TagPairs(RecipeModel):
    """Item <-> tags and user <-> tags from `inputs.item_tags`."""

    enabled: bool = True
    top_k: int = Field(default=5, ge=1)
    exclude: list[str] = Field(default_factory=list, description="tags never used (e.g. to-read, favorites)")
    users: bool = True
    items: bool = True


class PairsCorpus(RecipeModel):
    enabled: bool = True
    query_item: QueryItemPairs = Field(default_factory=QueryItemPairs)
    item_item: ItemItemPairs = Field(default_factory=ItemItemPairs)
    user_item: UserItemPairs = Field(default_factory=UserItemPairs)
    tags: TagPairs = Field(default_factory=TagPairs)


class MixCorpus(RecipeModel):
    """Weighted, seeded interleaving of this run's train corpora (and the replay corpus, named `replay`)."""

    enabled: bool = False
    weights: dict[str, Weight] = Field(default_factory=dict)
    total_rows: int | None = Field(
        default=None, ge=1, description="None = as many rows as the weights allow without repeating any corpus"
    )


class DataRecipe(RecipeModel):
    out_dir: str = "runs/data"
    seed: int = Field(default=0, ge=0)
    inputs: Inputs = Field(default_factory=Inputs)
    serializer: SerializerConfig = Field(default_factory=SerializerConfig)
    token_count: TokenCountConfig = Field(default_factory=TokenCountConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    items: ItemsCorpus = Field(default_factory=ItemsCorpus)
    queries: QueriesCorpus = Field(default_factory=QueriesCorpus)
    query_item: QueryItemCorpus = Field(default_factory=QueryItemCorpus)
    field_targets: FieldTargetsCorpus = Field(default_factory=FieldTargetsCorpus)
    in_context: InContextCorpus = Field(default_factory=InContextCorpus)
    reading: ReadingCorpus = Field(default_factory=ReadingCorpus)
    pairs: PairsCorpus = Field(default_factory=PairsCorpus)
    mix: MixCorpus = Field(default_factory=MixCorpus)
    rows_per_shard: int = Field(default=100_000, ge=1)
    strict: bool = Field(default=False, description="stop at the first malformed input row (also --strict)")
