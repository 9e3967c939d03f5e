"""Recipes of the align stage: `recforge align`, `recforge embed`, `recforge eval retrieval`.

One pydantic model per job (TRL style). Every path is a plain string so it can be overridden from
the command line: `recforge align align/recipes/esci_minilm.yaml data.pairs_path=runs/data/esci/pairs`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from recforge.config import TRAINING_ARGUMENTS_RENAMED, RecipeModel, WarmupSteps
from recforge.splits import SplitRule


class BackboneConfig(RecipeModel):
    """The model turned into an embedding model: an encoder, or a causal LM (base, CPT output, merged)."""

    path: str = Field("minilm", description="model folder; `minilm` = the offline all-MiniLM-L6-v2; `tiny` = build the tiny LM")
    kind: Literal["auto", "encoder", "causal_lm"] = "auto"
    max_seq_length: int = 64
    trust_remote_code: bool = False  # never on unless the user sets it
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    # LLM backbones: weights loaded in this dtype (bfloat16 halves memory; the optimizer then steps bf16 weights),
    # and activation recomputation to fit longer texts / larger batches
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    gradient_checkpointing: bool = False
    # keep only the first N transformer layers: the embedding is then that (middle) layer's state, and training
    # and inference cost N/total of the full model; the exported config has N layers (plain SentenceTransformer)
    num_layers: int | None = Field(None, ge=1)


class PoolingConfig(RecipeModel):
    """How token states become one vector.

    `last_token`: the tokenizer is re-configured to append EOS, and the state of the last real token
    (right under left and right padding) is taken. `mean`: average over tokens, instruction prompt excluded.
    `compression`: NoteLLM's prompt `... compress it into one word: "[EMB]"`; the state just before `[EMB]`.
    `auto`: `mean` for encoders, `last_token` for causal LMs.
    """

    mode: Literal["auto", "last_token", "mean", "cls", "compression"] = "auto"
    compression_suffix: str = ' compress it into one word: "'
    projection_dim: int | None = None  # optional projection to a smaller dimension
    projection: Literal["linear", "mlp"] = "linear"
    normalize: bool = True


class GenerationLossConfig(RecipeModel):
    """NoteLLM's generation targets (used when `loss.generation_weight` > 0, causal-LM backbones only).

    Targets come from the training pairs' `item_tag` rows (item -> its tags, e.g. data_recipes' goodbooks
    shelf tags) unless `targets_path` names a catalogue file with a tags list and/or a category field.
    """

    targets_path: str | None = None  # JSONL / Parquet; default: the training pairs' item_tag rows
    id_field: str = "item_id"
    hashtags_field: str | None = "tags"  # list of strings, or of objects with `tag_name_key`
    tag_name_key: str = "tag_name"
    category_field: str | None = "category"
    exclude_tags: list[str] = Field(default_factory=list)
    hashtag_share: float = Field(0.4, ge=0.0, le=1.0, description="NoteLLM: 40 % hashtags, the rest category")
    max_hashtags: int = 3
    max_target_tokens: int = 24


class LossConfig(RecipeModel):
    """InfoNCE with in-batch negatives (+ hard negatives when the pairs carry them).

    `mask_false_negatives` or `learnable_temperature` need recforge's `InfoNCELoss` (sentence-transformers'
    losses cannot know item ids); otherwise sentence-transformers' MultipleNegativesRankingLoss is used,
    or CachedMultipleNegativesRankingLoss (GradCache) when `gradcache_mini_batch` is set.
    """

    temperature: float = 0.05
    learnable_temperature: bool = False
    symmetric: bool = False
    mask_false_negatives: bool = True
    use_hard_negatives: bool = True
    gradcache_mini_batch: int | None = None
    matryoshka_dims: list[int] = Field(default_factory=list)
    gather_across_devices: bool = False
    kind_weights: dict[str, float] = Field(default_factory=dict, description="LARR: weight per pair kind")
    use_pair_weights: bool = False  # weight each pair's term by its `weight` column (raw counts can be very skewed)
    generation_weight: float = Field(0.0, ge=0.0, description="NoteLLM α: (InfoNCE + α·generation)/(1+α); 0 = off")
    generation: GenerationLossConfig = Field(default_factory=GenerationLossConfig)


class EsciSource(RecipeModel):
    queries: str = "sample://esci_us_titles/queries.jsonl.gz"
    products: str = "sample://esci_us_titles/products.jsonl.gz"
    judgments: str = "sample://esci_us_titles/judgments.jsonl.gz"
    min_positive_grade: float = 2.0  # ESCI: 3 exact, 2 substitute -> positives
    # Inverse-cloze-style pseudo queries (Lee et al. 2019): a few words cut from each catalogue title become an
    # extra (pseudo query -> title) training pair. Catalogue text only: held-out queries and judgments are never read.
    pseudo_queries_per_product: int = Field(0, ge=0)
    pseudo_query_words: tuple[int, int] = (1, 4)
    pseudo_query_from_first_words: int = 12  # spans from the head of the title (what a short max_seq_length keeps)
    # Model selection without touching the held-out queries: `validation` scores on a share of the TRAINING
    # queries (chosen by a salted hash of query_id) and trains on the rest; the held-out queries and their
    # judgments are then never used at all. `heldout` (the default) trains on every training query.
    eval_on: Literal["heldout", "validation"] = "heldout"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    validation_salt: str = "align-validation"


class MovieLensSource(RecipeModel):
    """Item <-> item co-engagement pairs from MovieLens sequences (never copied into the repo)."""

    path: str = "../shared/data/movielens_100k"
    window: int = 3  # items within this many steps in a user's sequence co-engage
    min_rating: float = 4.0
    top_k_per_item: int = 10
    max_train_pairs: int = 3000


class ExtraPairs(RecipeModel):
    """More training pairs joining the source's (e.g. the kept LLM pseudo-queries of `recforge pseudo-filter`):
    a pairs Parquet file/folder (`recforge.records.pairs_schema()`), train rows only, each weighted by `weight`
    (effective with `loss.use_pair_weights: true`); false-negative masking uses their `anchor_positive_ids`."""

    path: str
    weight: float = Field(1.0, gt=0.0)
    max_pairs: int | None = Field(None, ge=1)


class DataConfig(RecipeModel):
    """Pairs to train on and held-out queries to evaluate on.

    Either `pairs_path` (Parquet in `recforge.records.pairs_schema()`, e.g. data_recipes' pairs output;
    rows with split != train are held out) or one of the built-in builders (`esci`, `movielens`).
    """

    source: Literal["esci", "pairs", "movielens"] = "esci"
    pairs_path: str | None = None
    esci: EsciSource = Field(default_factory=EsciSource)
    movielens: MovieLensSource = Field(default_factory=MovieLensSource)
    max_train_pairs: int | None = None
    kinds: list[str] | None = None  # pairs files: keep only these pair kinds (train and held-out), e.g. [item_item]
    max_train_pairs_per_kind: int | None = None  # pairs files: cap each kind (hash-sampled)
    max_eval_queries_per_kind: int | None = None
    extra_pairs: list[ExtraPairs] = Field(default_factory=list)
    query_prompt: str | None = None  # instruction prefix for anchors (queries / users)
    document_prompt: str | None = None

    @model_validator(mode="after")
    def _pairs_need_path(self):
        if self.source == "pairs" and not self.pairs_path:
            raise ValueError("data.source=pairs needs data.pairs_path")
        return self


class TrainConfig(RecipeModel):
    """The `train:` keys, under Hugging Face `TrainingArguments`' names (passed on as such)."""

    renamed_keys = TRAINING_ARGUMENTS_RENAMED  # an old key (`epochs`, `batch_size`, `warmup_ratio`) fails naming the new one

    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_steps: WarmupSteps = 0.1  # float in [0, 1) = ratio of total steps, int >= 1 = steps
    weight_decay: float = 0.0
    max_steps: int = -1
    no_duplicates_sampler: bool = True  # sentence-transformers' NO_DUPLICATES batch sampler
    bf16: bool = False  # bf16 autocast (weights stay in backbone.dtype); on CUDA, or a CPU with bf16 support
    logging_steps: int = 10


class EvalConfig(RecipeModel):
    k_values: list[int] = Field(default_factory=lambda: [1, 5, 10, 100])
    batch_size: int = 64
    compare_base: bool = True


# auto: CUDA when present, else CPU; or cpu, cuda, cuda:N, mps
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]


class AlignConfig(RecipeModel):
    out_dir: str = "runs/align/esci_minilm"
    seed: int = 0
    device: Device = "auto"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    pooling: PoolingConfig = Field(default_factory=PoolingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    # held-out ESCI queries / MovieLens anchor items: the project rule (recforge/splits.py), as every stage;
    # a pairs file keeps the split column data_recipes wrote
    split: SplitRule = Field(default_factory=SplitRule)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class CatalogueSource(RecipeModel):
    path: str = "sample://goodbooks_10k_catalog/books.jsonl.gz"
    id: str = "book_id"
    text_fields: list[str] = Field(default_factory=lambda: ["title", "authors"])
    prompt_name: str | None = None


class EmbedConfig(RecipeModel):
    model: str = "runs/align/esci_minilm/model"
    out_dir: str = "runs/embed/goodbooks"
    device: Device = "auto"
    catalogue: CatalogueSource = Field(default_factory=CatalogueSource)
    batch_size: int = 64
    shard_size: int = 2048
    sort_by_length: bool = True
    quantize: Literal["none", "int8"] = "none"
    # the encoder's arithmetic (vectors are stored float32 or int8 either way): bfloat16 weights (AMX / GPU).
    # int8 dynamic quantisation is not offered: on MiniLM its vectors reach only cos 0.956 to float32
    # (bench/align_embed.py measures it), below the 0.999 a catalogue index needs
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    faiss_index: bool = True
    max_seq_length: int | None = None
    limit: int | None = None


class RetrievalEvalConfig(RecipeModel):
    """`recforge eval retrieval`: score one or more models on the same held-out queries."""

    out_dir: str = "runs/eval/retrieval"
    seed: int = 0
    device: Device = "auto"
    models: dict[str, str] = Field(default_factory=lambda: {"base": "minilm", "tuned": "runs/align/esci_minilm/model"})
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitRule = Field(default_factory=SplitRule)  # must match the align run's, so the held-out queries match
    eval: EvalConfig = Field(default_factory=EvalConfig)


class PseudoFilterConfig(RecipeModel):
    """`recforge pseudo-filter RECIPE`: Promptagator-style round-trip consistency filter of LLM pseudo-queries.

    Reads the queries `recforge generate` wrote for catalogue items (a generate run folder of the
    `pseudo_queries` task, or a features Parquet with `entity_id` / `pseudo_queries`), embeds them and the whole
    catalogue with `model` (the current embedder), and keeps a query only where its own item is among the
    `top_k` items it retrieves. Writes the kept (query -> item) pairs as a pairs Parquet that `recforge align`
    joins through `data.extra_pairs`. Reads catalogue text only: no query or judgment file is an input.
    """

    out_dir: str = "runs/pseudo/esci"
    seed: int = 0
    device: Device = "auto"
    generated: str = "runs/generate/esci_pseudo_queries"
    allow_partial: bool = False  # read a generate run that did not finish (recorded in the report)
    catalogue: CatalogueSource = Field(default_factory=lambda: CatalogueSource(
        path="sample://esci_us_titles/products.jsonl.gz", id="product_id", text_fields=["product_title"]))
    model: str = "minilm"  # an alias (minilm, smollm2) or any SentenceTransformer folder, e.g. an aligned model
    query_prompt_name: str | None = "query"  # used where the model has a prompt of that name
    document_prompt_name: str | None = "document"
    filter: Literal["top_k", "none"] = "top_k"
    top_k: int = Field(5, ge=1)
    max_queries_per_item: int | None = Field(None, ge=1)
    min_words: int = Field(1, ge=1)
    # a small LLM often copies the title back as a "query": such a copy retrieves its item trivially (the round trip
    # keeps it) and teaches title -> title only. Dropped before scoring: longer than max_words, or the title itself
    max_words: int | None = Field(8, ge=1)
    drop_title_copies: bool = True
    weight: float = Field(1.0, gt=0.0, description="written into the kept pairs' weight column")
    batch_size: int = 64
