"""MovieLens item -> item co-engagement pairs (NoteLLM-style I2I); the data is read from a path, never shipped."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from recforge.align.align_config import AlignConfig, MovieLensSource
from recforge.align.pairs import build_movielens
from recforge.config import RecforgeError, load_recipe
from recforge.splits import SplitRule

REPO = Path(__file__).resolve().parents[1]
# read from a path (its licence forbids redistribution: never committed); MOVIELENS=... points at another copy
MOVIELENS = Path(os.environ.get("MOVIELENS", REPO / "../shared/data/movielens_100k")).resolve()


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_co_engagement_pairs_and_split(tmp_path):
    items = [{"item_id": i, "title": f"Movie {i}", "genres": ["Drama"]} for i in range(1, 41)]
    # users like movies in runs: i, i+1, i+2 co-occur; movie 40 is disliked by everyone
    seqs = [{"user_id": u, "item_ids": [u, u + 1, u + 2, 40], "ratings": [5, 5, 4, 1], "timestamps": [1, 2, 3, 4]}
            for u in range(1, 38)]
    write_jsonl_gz(tmp_path / "items.jsonl.gz", items)
    write_jsonl_gz(tmp_path / "sequences.jsonl.gz", seqs)
    data = build_movielens(MovieLensSource(path=str(tmp_path), window=2, top_k_per_item=3), SplitRule(eval_percent={"item": 30}))
    held = set(data.task.queries)
    trained = {p["anchor_id"] for p in data.train_pairs}
    assert held and trained and not held & trained
    for p in data.train_pairs:
        a, b = int(p["anchor_id"]), int(p["positive_id"])
        assert abs(a - b) <= 2 and 40 not in (a, b)  # co-engaged within the window, never the disliked movie
        assert p["positive_id"] in p["anchor_positive_ids"]
        assert p["anchor"] == f"Movie {a} — Drama"
    assert all("40" not in q for q in data.task.qrels.values())


def test_missing_movielens_is_a_clear_error(tmp_path):
    with pytest.raises(RecforgeError, match="data.movielens.path"):
        build_movielens(MovieLensSource(path=str(tmp_path / "absent")))


@pytest.mark.slow
@pytest.mark.skipif(not (MOVIELENS / "sequences.jsonl.gz").is_file(), reason="MovieLens-100K not present")
def test_movielens_i2i_recipe_improves_recall(tmp_path):
    from recforge.align.trainer import run_align

    cfg = load_recipe(AlignConfig, REPO / "align/recipes/i2i_ml100k.yaml",
                      [f"out_dir={tmp_path / 'run'}", f"data.movielens.path={MOVIELENS}", "data.movielens.max_train_pairs=600"])
    out = run_align(cfg)
    assert out["metrics"]["tuned"]["recall@100"] > out["metrics"]["base"]["recall@100"]
