"""`recforge generate RECIPE.yaml key=value ...`: the recipe of a mass-generation run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from recforge.config import RecipeModel
from recforge.splits import SplitRule


class HistoryConfig(RecipeModel):
    """Builds a user's `history` ([{title, rating}], time order) from id/rating lists and an item catalogue."""

    items_path: str
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    item_id: str = "item_id"
    title_field: str = "title"
    ids_column: str = "item_ids"
    ratings_column: str | None = None
    kar_prefix: bool = Field(default=True, description="KAR leakage guard: keep only the first min((n+1)//2, 30) events")
    min_events: int = 1


class InputConfig(RecipeModel):
    """Where the records come from.

    kind=items: a catalogue read by `recforge.readers.read_items` (`fields` maps template
    field -> column; malformed rows go to rejects.jsonl). kind=records: rows used as they are (nested values
    such as a user's `history` list; `recforge.readers.read_records`, any `format`), `id` naming the id column.
    """

    path: str
    kind: Literal["items", "records"] = "items"
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    id: str
    fields: dict[str, str] = Field(default_factory=dict)
    constants: dict[str, Any] = Field(default_factory=dict, description="added to every record, e.g. entity_type, domain")
    split: Literal["all", "train", "heldout"] = Field(
        default="all", description="keep one side of the project split (the recipe's top-level `split:` rule, "
                                   "recforge/splits.py) of `split_entity`: heldout = the ids data_recipes puts in eval "
                                   "and finetune never trains on"
    )
    split_entity: Literal["item", "book", "user", "query"] | None = Field(
        default=None, description="which entity the ids are, for `split` (recforge.splits hashes `<entity>:<id>`): "
                                  "item (ESCI products, movies; the default for kind=items), book (goodbooks books: the "
                                  "books finetune's tags SFT and eval tags hold out), user, query; required for kind=records"
    )
    limit: int | None = Field(default=None, ge=1)
    history: HistoryConfig | None = Field(default=None, description="kind=records: build `history` for user prompts")

    @model_validator(mode="after")
    def _entity_named(self):
        if self.split != "all" and self.kind == "records" and self.split_entity is None:
            raise ValueError("input.split_entity (user, query, item or book) is required with input.split on kind=records")
        return self

    @property
    def entity(self) -> str:
        """The split entity `split` hashes the ids as."""
        return self.split_entity or "item"


class ModelConfig(RecipeModel):
    name_or_path: str = Field(description="a folder, a hub id, or an offline alias: smollm2, qwen2.5-0.5b")
    revision: str | None = None
    adapter: str | None = Field(default=None, description="a PEFT/LoRA adapter folder served on top of the model")
    fallback: str | None = Field(default=None, description="used (and recorded) when name_or_path is a missing local path")
    dtype: str = "auto"
    trust_remote_code: bool = False


class EngineConfig(RecipeModel):
    kind: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(default=16, ge=1, description="transformers: rows per generate call")
    device: str | None = None
    cpu_threads: int | None = Field(default=None, ge=1, description="transformers on CPU: torch threads (1 is best for tiny models)")
    max_model_len: int | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, description="vLLM on GPU: fraction of GPU memory")
    kv_cache_gib: float | None = Field(default=None, gt=0, description="vLLM: KV cache size (CPU default 2 GiB)")
    enforce_eager: bool | None = Field(default=None, description="vLLM: skip torch.compile (default: eager on CPU)")
    max_lora_rank: int | None = Field(default=None, ge=1, description="vLLM: LoRA slot rank (default: the adapter's, rounded up)")


class SamplingOverrides(RecipeModel):
    """Overrides of the prompt spec's default sampling (unset keys keep the spec's value)."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None


class TaxonomyConfig(RecipeModel):
    """A fixed tag vocabulary: listed, or the `top` most frequent book-describing shelf tags of the training books."""

    tags: list[str] | None = None
    from_book_tags: str | None = None
    top: int = 100


class GenerateConfig(RecipeModel):
    task: str = Field(description="a shipped prompt name (interest_tags, ...) or a path to your own task.j2")
    prompt_vars: dict[str, Any] = Field(default_factory=dict)
    input: InputConfig
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingOverrides = Field(default_factory=SamplingOverrides)
    taxonomy: TaxonomyConfig | None = None
    # the project split rule (recforge/splits.py), as every stage's `split:` section: which books are held out for
    # `input.split` and which are training books for `taxonomy.from_book_tags`; recorded in the manifest
    split: SplitRule = Field(default_factory=SplitRule)
    seed: int = 0
    max_retries: int = Field(default=2, ge=0)
    retry_temperature: float = Field(default=0.7, gt=0, description="retries of a greedy run sample at this temperature")
    chunk_size: int = Field(default=64, ge=1, description="rows per output shard (the unit of resume)")
    submit_rows: int = Field(
        default=512, ge=1,
        description="rows of several chunks rendered and sent to the engine in one call (vLLM schedules them "
                    "together); each chunk's shard is still written separately, in order",
    )
    max_failure_rate: float = Field(
        default=0.2, ge=0, le=1, description="exit status 1 when failed.jsonl holds more than this share of the inputs"
    )
    max_consecutive_engine_errors: int = Field(
        default=32, ge=0,
        description="stop after this many rows in a row ended with an engine error (0 = never); the chunk where it "
                    "happens and all later ones stay un-done, so a rerun resumes there",
    )
    out_dir: str = "runs/generate/default"
