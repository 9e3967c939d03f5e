"""Goodbooks shelf tags as the project scores them: the reader-shelf rule and P@k / R@k.

One place for both, so `recforge eval tags` (generate) and the tags SFT's own eval metric (finetune) score a tagger
the same way, and SFT trains on exactly the shelves the metric counts. The rule is documented in
generate/tag_eval.py's opening comment.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from recforge.generation_features import normalize_tag

READER_SHELVES = {
    "to-read", "currently-reading", "read", "favorites", "favourites", "favorite", "favourite", "faves", "fave",
    "owned", "owned-books", "books-i-own", "i-own", "own-it", "own", "my-books", "my-library", "library",
    "kindle", "ebook", "ebooks", "e-book", "e-books", "audiobook", "audiobooks", "audio", "audible", "default",
    "wish-list", "wishlist", "to-buy", "re-read", "reread", "re-reads", "rereads", "to-re-read", "to-reread",
    "read-again", "books", "book", "book-club", "bookclub", "must-read", "must-reads", "finished", "on-my-shelf",
    "all-time-favorites", "all-time-favourites", "favorite-books", "favourite-books", "my-favorites",
    "my-favourites", "shelfari-favorites", "dnf", "did-not-finish", "abandoned", "tbr", "school", "for-school",
    "high-school", "required-reading", "read-for-school", "school-books", "school-reads", "school-reading",
    "read-in-school", "stand-alone", "standalone", "series", "borrowed", "nook", "paperback", "hardcover",
    "physical-books", "unfinished", "didn-t-finish", "maybe", "someday", "wish", "kindle-books", "e-reader",
}
READER_SHELF_PATTERN = re.compile(
    r"^(to-|read-|re-?read|currently|my-|own|i-own|favou?rite|fave|all-time|wish|tbr|dnf|did-not|abandoned|"
    r"kindle|e-?books?|audio|library|shelfari|book-?club|school|for-school|high-school|required)"
    r"|read.*(19|20)\d\d|(19|20)\d\d.*read|^\d+(-|\.)?stars?$|^[0-5]-stars?"
)


def is_reader_shelf(tag: str) -> bool:
    t = normalize_tag(tag)
    return (not t) or t in READER_SHELVES or bool(READER_SHELF_PATTERN.search(t))


def book_shelf_tags(tags: Iterable[dict], top: int) -> list[str]:
    """A book's tag list ([{tag_name, count}], count-ordered) -> its top book-describing normalised shelves."""
    counts: Counter = Counter()
    for t in tags:
        name = normalize_tag(t["tag_name"])
        if not is_reader_shelf(name):
            counts[name] += int(t.get("count", 1))
    return [t for t, _ in counts.most_common(top)]


def clean_predicted(tags: Iterable[str]) -> list[str]:
    """Predicted tags scored like the truth: normalised, reader shelves dropped, duplicates removed, order kept."""
    out: list[str] = []
    for t in tags:
        n = normalize_tag(t)
        if n and not is_reader_shelf(n) and n not in out:
            out.append(n)
    return out


def precision_recall_at_k(pred: dict[str, list[str]], truth: dict[str, list[str]], k: int) -> dict:
    """Mean P@k (hits in the first k / k) and R@k (hits / |truth|) over every truth book (no prediction = 0).

    Predictions go through `clean_predicted` first (a model trained on raw shelves may say `favorites`).
    """
    p_sum = r_sum = 0.0
    covered = 0
    for bid, gold in truth.items():
        guess = clean_predicted(pred.get(bid, []))[:k]
        if bid in pred:
            covered += 1
        hits = len(set(guess) & set(gold))
        p_sum += hits / k
        r_sum += hits / len(gold)
    n = max(len(truth), 1)
    return {f"precision@{k}": round(p_sum / n, 4), f"recall@{k}": round(r_sum / n, 4), "books": len(truth), "books_with_tags": covered}
