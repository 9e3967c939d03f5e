"""The recipe's inputs as the frames the builders share: (id, text) per item and per query, graded judgments,
and documents' token counts.

Each item is serialised once here (every configured field, no dropout), and every corpus that holds item texts -
query-item rows, in-context groups, pairs, reading rows - joins these frames rather than serialising again.
"""

from __future__ import annotations

import polars as pl

from recforge.data_recipes.serialize import Serializer, TokenCounter
from recforge.records import Item, Judgment, Query


def item_text_frame(items: list[Item], serializer: Serializer) -> pl.DataFrame:
    """(id, text) per item, every configured field, no dropout (the texts pairs and groups share)."""
    return pl.DataFrame(
        {"id": [it.item_id for it in items], "text": [serializer.serialize(it, dropout=False) for it in items]},
        schema={"id": pl.Utf8, "text": pl.Utf8},
    ).filter(pl.col("text") != "")


def query_text_frame(queries: list[Query], serializer: Serializer) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": [q.query_id for q in queries], "text": [serializer.serialize_query(q.text) for q in queries]},
        schema={"id": pl.Utf8, "text": pl.Utf8},
    )


def judgments_frame(judgments: list[Judgment]) -> pl.DataFrame:
    return pl.DataFrame(
        {"query_id": [j.query_id for j in judgments], "item_id": [j.item_id for j in judgments],
         "grade": [float(j.grade) for j in judgments]},
        schema={"query_id": pl.Utf8, "item_id": pl.Utf8, "grade": pl.Float64},
    )


def with_token_counts(texts: pl.DataFrame, counter: TokenCounter, max_tokens: int | None = None) -> pl.DataFrame:
    """Add `n_tokens`; documents longer than `max_tokens` are cut to it (they would never fit a row)."""
    method = counter.config.method
    if method == "whitespace":
        texts = texts.with_columns(pl.col("text").str.count_matches(r"\S+").cast(pl.Int64).alias("n_tokens"))
    elif method == "chars":
        n = (pl.col("text").str.len_chars() / counter.config.chars_per_token).round().cast(pl.Int64)
        texts = texts.with_columns(pl.when(pl.col("text") == "").then(0).otherwise(pl.max_horizontal(n, 1)).alias("n_tokens"))
    else:
        texts = texts.with_columns(pl.Series("n_tokens", counter.count_many(texts["text"].to_list()), dtype=pl.Int64))
    if max_tokens is not None:
        long = texts.filter(pl.col("n_tokens") > max_tokens)
        if long.height:
            cut = [counter.truncate(t, max_tokens) for t in long["text"].to_list()]
            fixed = long.with_columns(pl.Series("text", cut), pl.lit(max_tokens, dtype=pl.Int64).alias("n_tokens"))
            texts = pl.concat([texts.filter(pl.col("n_tokens") <= max_tokens), fixed])
    return texts
