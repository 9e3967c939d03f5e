"""Tag quality against goodbooks shelf tags: precision@k / recall@k on held-out books.

Ground truth per book = its Goodreads shelves, normalised (`normalize_tag`), with shelves that describe
the *reader* rather than the book removed, then the `truth_top` most-used remaining shelves.

Reader-shelf rule (documented, deterministic): a normalised shelf is dropped when it
- is in READER_SHELVES (reading status, ownership, formats, favourites, generic `books`, `default`, ...), or
- matches READER_SHELF_PATTERN: starts with to-, read-, re-read, currently-, my-, own, i-own, favorite/favourite,
  fave, all-time, wish, tbr, dnf, did-not-finish, abandoned, kindle, e-book/ebook, audio, library, shelfari,
  book-club/bookclub, school/for-school/high-school, required; or contains a year (19xx/20xx) next to `read`; or
  is an `N-stars` rating shelf.
Genre, theme, period, place and list shelves (`fantasy`, `20th-century`, `1001-books`) stay.
Predicted tags are cleaned by the same rule before scoring (`clean_predicted`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from recforge.generate.generate_config import SPLIT_SIDES
from recforge.generate.postprocess import normalize_tag
from recforge.readers import FileKey, RejectLog, SourceConfig, read_records
from recforge.splits import DEFAULT_RULE, SplitRule, describe, split_of

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


def read_truth(path: str, split: str = "heldout", top: int = 10, rejects: RejectLog | None = None,
               rule: SplitRule = DEFAULT_RULE) -> dict[str, list[str]]:
    """Book id -> its top book-describing shelves, for the books of one side of the project's book split (`rule`).

    Read through the quarantining reader: a row without a book id or with a malformed tag list goes to
    `rejects` (file, line, reason) instead of stopping the evaluation."""
    rows = read_records(SourceConfig(path=path, id="book_id"), rejects if rejects is not None else RejectLog(),
                        FileKey("--truth"), {"tags": "tags"})
    truth = {}
    for bid, row in rows:
        if split == "all" or split_of("book", bid, rule) == SPLIT_SIDES[split]:
            tags = book_shelf_tags(row.get("tags") or [], top)
            if tags:
                truth[bid] = tags
    return truth


def top_train_tags(path: str, top: int = 100, rule: SplitRule = DEFAULT_RULE) -> list[str]:
    """The `top` book-describing shelves most often among the training books' top-10 lists (a fixed taxonomy)."""
    counter: Counter = Counter()
    for tags in read_truth(path, split="train", top=10, rule=rule).values():
        counter.update(tags)
    return sorted(counter, key=lambda t: (-counter[t], t))[:top]


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


def evaluate_tags(pred: dict[str, list[str]], truth_path: str, k: int = 5, truth_top: int = 10, split: str = "heldout",
                  ids: set[str] | None = None, rule: SplitRule = DEFAULT_RULE) -> dict:
    """Scores over the truth books among `ids` (a run's input ids: failed rows count as zero), else all of them;
    `split` is a side of `rule` (a generate run's own rule, from its manifest)."""
    rejects = RejectLog()
    truth = read_truth(truth_path, split=split, top=truth_top, rejects=rejects, rule=rule)
    if ids is not None:
        truth = {b: t for b, t in truth.items() if b in ids}
    result = precision_recall_at_k(pred, truth, k)
    # Reference: the k most common training shelves predicted for every book (a model should beat this).
    popular = top_train_tags(truth_path, k, rule)
    result["popular_baseline"] = precision_recall_at_k({b: popular for b in truth}, truth, k)
    result.update({"k": k, "truth_top": truth_top, "split": split, "split_rule": describe("book", rule),
                   "truth_rejects": {"total": rejects.total, "by_reason": dict(rejects.counts), "rows": rejects.kept[:20]}})
    return result

