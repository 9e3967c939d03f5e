"""`recforge generate` on KAR's user-history path (generate/recipes/goodbooks_user_preferences.yaml), tiny model.

What a user relies on: a `kind: records` input with `history:` becomes one prompt per user that shows only the
user's leakage-guarded prefix (`recforge.splits.kar_prefix_length`: the first min((n+1)//2, 30) rated books, in
time order, with their ratings) — never a later book, which the CTR bridge uses as a label — and one output row
(or one failure with its reason) per user.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from recforge.cli import main
from recforge.generate.runner import read_generations
from recforge.generate.transformers_engine import TransformersEngine
from recforge.io import resolve_path
from recforge.splits import kar_prefix_length

RECIPE = Path(__file__).resolve().parents[1] / "generate" / "recipes" / "goodbooks_user_preferences.yaml"
USERS = 4


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Keep the sha256 cache of model files (recforge.fingerprint) out of the home folder."""
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))


def jsonl(path: str) -> list[dict]:
    with gzip.open(resolve_path(path), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_histories(min_events: int, users: int) -> dict[str, tuple[str, str, int]]:
    """user -> (the prompt's history sentence, the history sentence one book longer, n) for the first `users` users
    with at least `min_events` guarded events, read straight from the shipped files (not through the runner)."""
    titles = {str(b["book_id"]): b["title"] for b in jsonl("sample://goodbooks_10k_ratings_subset/items.jsonl.gz")}
    out = {}
    for seq in jsonl("sample://goodbooks_10k_ratings_subset/sequences.jsonl.gz"):
        events = [(titles[str(b)], r) for b, r in zip(seq["book_ids"], seq["ratings"]) if str(b) in titles]
        assert len(events) == len(seq["book_ids"])  # every book of the sample is in its catalogue
        keep = kar_prefix_length(len(events))
        if keep < min_events:
            continue
        sentence = lambda k: "; ".join(f'"{t}", {r} stars' for t, r in events[:k]) + "."  # noqa: E731
        out[str(seq["user_id"])] = (sentence(keep), sentence(keep + 1), len(events))
        if len(out) == users:
            break
    return out


def test_user_preferences_prompts_hold_only_the_guarded_prefix(tiny_model_dir, tmp_path, monkeypatch):
    prompts: dict[str, str] = {}
    real_generate = TransformersEngine.generate

    def record_prompts(self, requests):  # the real engine runs; the prompts it is sent are kept for the checks
        for req in requests:
            prompts.setdefault(req.request_id, req.prompt)
        return real_generate(self, requests)

    monkeypatch.setattr(TransformersEngine, "generate", record_prompts)
    out = tmp_path / "out"
    rc = main(["generate", str(RECIPE), f"model.name_or_path={tiny_model_dir}", f"out_dir={out}", f"input.limit={USERS}",
               "engine.max_model_len=2048", "sampling.max_tokens=96", "max_retries=0", "max_failure_rate=1.0",
               "--no-progress"])
    assert rc == 0

    expected = expected_histories(min_events=3, users=USERS)  # the recipe's input.history.min_events
    assert len(expected) == USERS and any(n > kar_prefix_length(n) for _, _, n in expected.values())
    # one prompt per user, showing exactly the guarded prefix: the sentence ends after the prefix's last book
    assert sorted(prompts) == sorted(expected)
    for user, (prefix, longer, n) in expected.items():
        assert f"who rated these books, in time order:\n{prefix}" in prompts[user], (user, prompts[user])
        assert longer not in prompts[user], f"user {user}: a book after the KAR prefix ({kar_prefix_length(n)} of {n}) leaked"

    # every user is exactly one output row (entity_type user, the task's JSON) or one failure with its reason
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["input_rows"] == USERS
    rows = read_generations(out).to_pylist()
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines() if line.strip()]
    ids = [r["id"] for r in rows] + [f["id"] for f in failed]
    assert sorted(ids) == sorted(expected)
    assert rows, "the tiny model, JSON-constrained, should complete some rows"
    for r in rows:
        assert r["entity_type"] == "user" and r["task"] == "kar_user_preference"
        assert json.loads(r["output"])["preferences"]
    assert all(f["reason"] for f in failed)
