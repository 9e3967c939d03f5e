"""Weighted mixing of row sources: how many rows a weight asks of a source, and which rows, how often, for a seed.

One rule, used by both stages that weight sources: `recforge data`'s `mix` corpus (relative weights over the
run's corpora, `recforge.data_recipes.mix`) and CPT's weighted training sources (`weight` x a corpus' rows,
`recforge.finetune.corpus.weighted_rows`). The counts differ only in what a weight means (`rows_for_shares`,
`rows_for_weight`); the rows taken for a count are always `take(height, want, seed)`.

Why not `datasets.interleave_datasets`: it draws the source of each next example at random from `probabilities`
(or cycles through the sources) and stops when one source, or every source, is exhausted, so how many rows each
source gives is a random outcome of the draws and the stopping strategy, not the weight's exact count; and it
needs the rows as `datasets.Dataset`s in memory, where the data mix picks row positions from row counts alone and
streams the picked rows from Parquet (`recforge.data_recipes.mix.write_mix`).
"""

from __future__ import annotations

import polars as pl


def take(height: int, want: int, seed: int) -> pl.Series:
    """The positions (0 .. height - 1) of the rows a source gives for `want` rows, `want` of them, in a seeded
    random order: a sample without replacement when the source has the rows (each row at most once); beyond, every
    row `want // height` times plus a sample without replacement for the rest (weight 2.0 = every row twice; a
    sample with replacement would leave ~e^-2 = 13 % of the rows unseen and repeat others).

    A function of (height, want, seed) alone: Polars' seeded `sample` picks positions from the height, the count
    and the seed, so sampling positions picks exactly the rows sampling the rows themselves would."""
    if want <= 0:
        return pl.Series("_pos", [], dtype=pl.Int64)
    if height <= 0:
        raise ValueError(f"take: {want} rows wanted from a source without rows")
    positions = pl.DataFrame({"_pos": pl.int_range(height, eager=True, dtype=pl.Int64)})
    if want <= height:
        return positions.sample(n=want, shuffle=True, seed=seed)["_pos"]
    whole, rest = divmod(want, height)
    repeated = pl.concat([positions] * whole + [positions.sample(n=rest, seed=seed)])
    return repeated.sample(fraction=1.0, shuffle=True, seed=seed)["_pos"]


def rows_for_weight(height: int, weight: float) -> int:
    """Rows for an absolute weight (CPT's sources): `weight` x the source's rows, the fraction's rows rounded."""
    whole = int(weight)
    return whole * height + round((weight - whole) * height)


def rows_for_shares(heights: dict[str, int], weights: dict[str, float],
                    total_rows: int | None) -> tuple[dict[str, float], dict[str, int]]:
    """Rows for relative weights (the data mix): (each source's share of the mix, its rows).

    The shares are the normalised weights; the total is `total_rows`, else the largest one no source has to repeat
    rows for. A source gets at least one row."""
    total_w = sum(weights.values())
    shares = {name: w / total_w for name, w in weights.items()}
    total = total_rows or int(min(heights[name] / share for name, share in shares.items()))
    return shares, {name: max(1, round(share * total)) for name, share in shares.items()}
