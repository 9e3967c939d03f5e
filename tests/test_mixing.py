"""One mixing rule (`recforge.mixing`, issue 26): `recforge data`'s mix corpus and CPT's weighted sources take the
same rows, as often, for the same count and seed; if either caller ever samples its own way, these fail."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from recforge.data_recipes.corpus_frames import corpus_from_rows
from recforge.data_recipes.mix import mix_corpora, mix_plan
from recforge.data_recipes.recipe_config import MixCorpus
from recforge.finetune.corpus import weighted_rows
from recforge.mixing import rows_for_shares, rows_for_weight, take


def rows(n: int, prefix: str = "r") -> list[dict]:
    return [{"row_id": f"{prefix}{i:03d}", "source": prefix, "documents": [f"doc {i}"]} for i in range(n)]


def corpus(n: int, prefix: str = "r"):
    return corpus_from_rows([dict(row_id=r["row_id"], source=r["source"], documents=r["documents"], doc_ids=[r["row_id"]],
                                  text=r["documents"][0], split="train", meta="{}") for r in rows(n, prefix)])


@pytest.mark.parametrize("n, total", [(40, 13), (40, 40), (40, 100)])  # a sample, every row, rows repeated
def test_the_data_mix_and_cpt_weighting_take_the_same_rows_as_often(n, total):
    """One source of n rows asked for `total` rows: the data mix (share 1, `total_rows`) and CPT (weight total / n)
    take each row the same number of times."""
    seed = random.Random(11).getrandbits(32)  # the seed `weighted_rows` draws first from random.Random(11)
    mixed = mix_corpora({"a": corpus(n)}, MixCorpus(enabled=True, weights={"a": 1.0}, total_rows=total), seed).frame
    from_mix = Counter(r.split(":", 2)[2] for r in mixed["row_id"].to_list())
    weight = total / n
    assert rows_for_weight(n, weight) == total
    from_cpt = Counter(r["row_id"] for r in weighted_rows(rows(n), weight, random.Random(11)))
    assert from_mix == from_cpt
    assert sum(from_cpt.values()) == total


def test_each_mixed_corpus_is_the_rule_applied_to_its_rows():
    heights = {"a": 57, "b": 9, "c": 30}
    cfg = MixCorpus(enabled=True, weights={"a": 0.5, "b": 0.3, "c": 0.2}, total_rows=80)  # b repeats rows
    plan, report = mix_plan(heights, cfg, seed=4)
    _, wants = rows_for_shares(heights, cfg.weights, cfg.total_rows)
    for i, name in enumerate(cfg.weights):
        got = plan.filter(plan["_mix_of"] == i)["_pos"].to_list()
        assert Counter(got) == Counter(take(heights[name], wants[name], 4 + i).to_list())
        assert report["ratios"][name]["rows"] == wants[name] == len(got)
    assert report["ratios"]["b"]["repeated"] and not report["ratios"]["a"]["repeated"]


def test_cpt_weights_keep_the_file_order_in_passes():
    src = rows(20)
    assert weighted_rows(src, 1.0, random.Random(0)) == src  # every row once, as in the file
    quarter = weighted_rows(src, 0.25, random.Random(0))
    assert len(quarter) == 5 and len({r["row_id"] for r in quarter}) == 5
    assert quarter == sorted(quarter, key=lambda r: r["row_id"])
    twice = weighted_rows(src, 2.0, random.Random(0))
    assert len(twice) == 40 and Counter(r["row_id"] for r in twice) == Counter(r["row_id"] for r in src * 2)
    ids = [r["row_id"] for r in twice]
    first_pass = ids[:len(set(ids))]  # every row taken, once each, in file order; then the repeats
    assert first_pass == sorted(set(ids))
    assert weighted_rows(src, 0.25, random.Random(0)) == quarter  # seeded


def test_take():
    assert sorted(take(10, 10, 1).to_list()) == list(range(10))
    small = take(10, 4, 1).to_list()
    assert len(small) == 4 and len(set(small)) == 4
    assert take(10, 4, 1).to_list() == small and take(10, 4, 2).to_list() != small
    assert Counter(take(3, 10, 1).to_list()) in ({0: 4, 1: 3, 2: 3}, {0: 3, 1: 4, 2: 3}, {0: 3, 1: 3, 2: 4})
    assert Counter(take(5, 10, 7).to_list()) == Counter(range(5)) + Counter(range(5))  # weight 2: every row twice
    assert take(0, 0, 1).len() == 0
