"""Where a benchmark writes its results: bench/results/ (committed), except MovieLens-100K's, which go to
runs/results/movielens/ (git-ignored): MovieLens and anything computed from it is never committed."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "bench" / "results"
MOVIELENS = REPO / "runs" / "results" / "movielens"


def results_dir(dataset: str) -> Path:
    folder = MOVIELENS if dataset in ("movielens", "ml100k", "movielens_100k") else COMMITTED
    folder.mkdir(parents=True, exist_ok=True)
    return folder
