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

from collections import Counter

from recforge.readers import FileKey, RejectLog, SourceConfig, read_records
from recforge.shelf_tags import book_shelf_tags, precision_recall_at_k
from recforge.splits import DEFAULT_RULE, SIDES, SplitRule, describe, split_of


def read_truth(path: str, split: str = "heldout", top: int = 10, rejects: RejectLog | None = None,
               rule: SplitRule = DEFAULT_RULE) -> dict[str, list[str]]:
    """Book id -> its top book-describing shelves, for the books of one side of the project's book split (`rule`).

    Read through the quarantining reader: a row without a book id or with a malformed tag list goes to
    `rejects` (file, line, reason) instead of stopping the evaluation."""
    rows = read_records(SourceConfig(path=path, id="book_id"), rejects if rejects is not None else RejectLog(),
                        FileKey("--truth"), {"tags": "tags"})
    truth = {}
    for bid, row in rows:
        if split == "all" or split_of("book", bid, rule) == SIDES[split]:
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

