"""Corpus builders on hand-made logs: serializer pieces, co-click grouping, packing, splits/leakage,
NoteLLM co-occurrence weights, pairs, reading, mix."""

from __future__ import annotations

import json

import polars as pl
import pytest

from recforge.config import RecforgeError
from recforge.data_recipes.catalogue_corpora import build_reading, replay_corpus
from recforge.data_recipes.corpus_frames import corpus_from_rows
from recforge.data_recipes.in_context import build_in_context
from recforge.data_recipes.input_frames import judgments_frame
from recforge.data_recipes.mix import mix_corpora
from recforge.data_recipes.pair_builders import (
    build_item_item_pairs,
    build_query_item_pairs,
    build_tag_pairs,
    build_user_item_pairs,
    co_engagement_scores,
)
from recforge.data_recipes.recipe_config import (
    InContextCorpus,
    ItemItemPairs,
    MixCorpus,
    QueryItemPairs,
    ReadingCorpus,
    TagPairs,
    UserItemPairs,
)
from recforge.data_recipes.serialize import Serializer, SerializerConfig, TokenCountConfig, TokenCounter
from recforge.data_recipes.splits import SplitConfig, leakage_check, with_holdout_last, with_time_split
from recforge.splits import split_frame
from recforge.records import Item, Judgment, Query

NO_EVAL = SplitConfig.uniform(0)


def events(rows: list[tuple]) -> pl.DataFrame:
    """(user, item, query, timestamp) tuples -> the frame `read_interactions` returns."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "query_id": [r[2] for r in rows],
            "event": ["click"] * len(rows), "timestamp": [float(r[3]) for r in rows],
            "label": [None] * len(rows), "weight": [None] * len(rows), "line": list(range(1, len(rows) + 1)),
        },
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "query_id": pl.Utf8, "event": pl.Utf8,
                "timestamp": pl.Float64, "label": pl.Float64, "weight": pl.Float64, "line": pl.Int64},
    )


def texts(ids: list[str], words: int = 3) -> pl.DataFrame:
    """Item texts with a known whitespace token count: 'item X w w' has `words` tokens."""
    return pl.DataFrame({"id": ids, "text": [" ".join(["item", i] + ["w"] * (words - 2)) for i in ids]})


# ---------------------------------------------------------------- serializer


BOOK = Item("7", {"title": "The Hobbit", "authors": ["J.R.R. Tolkien", "C. Tolkien"], "year": 1937,
                  "description": "A hobbit goes on an unexpected journey with thirteen dwarves and a wizard"})


def test_plain_style_orders_fields_and_renders_lists_and_numbers():
    ser = Serializer(SerializerConfig(fields=["authors", "title", "year"], labels={"authors": "By"}))
    assert ser.serialize(BOOK) == "By: J.R.R. Tolkien, C. Tolkien\nTitle: The Hobbit\nYear: 1937"
    assert ser.special_tokens() == []  # plain text adds no tokens


def test_pieces_generic_tokens_wrap_every_field_and_are_reported():
    ser = Serializer(SerializerConfig(style="pieces", fields=["title", "year"]))
    text = ser.serialize(BOOK)
    assert text == "<|startofpiece|>Title: The Hobbit<|endofpiece|><|startofpiece|>Year: 1937<|endofpiece|>"
    assert ser.serialize_query("hobbit book") == "<|startofpiece|>Query: hobbit book<|endofpiece|>"
    assert ser.special_tokens() == ["<|endofpiece|>", "<|startofpiece|>"]


def test_pieces_per_field_tokens_only_for_emitted_fields():
    ser = Serializer(SerializerConfig(style="pieces", piece_tokens="per_field", fields=["title", "authors", "isbn"]))
    text = ser.serialize(BOOK)
    assert text == "<|title|>The Hobbit<|endofpiece|><|authors|>J.R.R. Tolkien, C. Tolkien<|endofpiece|>"
    ser.serialize_query("x")
    # isbn is absent from the item, so no <|isbn|> token is reported for finetune to add
    assert ser.special_tokens() == ["<|authors|>", "<|endofpiece|>", "<|query|>", "<|title|>"]


def test_field_budgets_cut_tokens_and_chars():
    ser = Serializer(SerializerConfig(fields=["title", "description"], max_tokens={"description": 4},
                                      max_chars={"title": 7}))
    assert ser.serialize(BOOK) == "Title: The Hob\nDescription: A hobbit goes on"
    chars = Serializer(SerializerConfig(fields=["description"], max_tokens={"description": 2}),
                       TokenCounter(TokenCountConfig(method="chars", chars_per_token=4)))
    assert chars.serialize(BOOK) == "Description: A hobbit"  # 2 tokens x 4 chars = 8 chars, then trailing space cut


def test_field_budget_with_a_real_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    counter = TokenCounter(TokenCountConfig(method="tokenizer", tokenizer=str(tiny_model_dir)))
    ser = Serializer(SerializerConfig(fields=["description"], max_tokens={"description": 5}), counter)
    desc = ser.serialize(BOOK).removeprefix("Description: ")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 0 < len(tok(desc, add_special_tokens=False)["input_ids"]) <= 5
    assert BOOK.fields["description"].startswith(desc)


def test_field_dropout_is_seeded_and_keeps_protected_fields():
    cfg = SerializerConfig(fields=["title", "authors", "year", "description"], field_dropout=0.5, keep_fields=["title"])
    runs = [[Serializer(cfg, seed=3).serialize(BOOK) for _ in range(1)] for _ in range(2)]
    assert runs[0] == runs[1]  # same seed, same output
    ser = Serializer(cfg, seed=3)
    outs = [ser.serialize(BOOK) for _ in range(200)]
    assert all(o.startswith("Title: The Hobbit") for o in outs)
    dropped = sum("Year:" not in o for o in outs) / len(outs)
    assert 0.35 < dropped < 0.65
    assert ser.serialize(BOOK, dropout=False).count("\n") == 3


# ---------------------------------------------------------------- in-context: co-click grouping and packing


JUDGED = judgments_frame([
    Judgment("q1", "A", 3), Judgment("q1", "B", 2), Judgment("q1", "C", 0),
    Judgment("q2", "B", 3), Judgment("q2", "D", 3), Judgment("q3", "E", 2),
])
QUERIES = pl.DataFrame({"id": ["q1", "q2", "q3"], "text": ["Query: one", "Query: two", "Query: three"]})


def test_in_context_groups_items_sharing_a_positive_query_and_queries_sharing_an_item():
    cfg = InContextCorpus(relations=["items_by_query", "queries_by_item"], max_tokens=100, min_grade=2)
    built = build_in_context(cfg, NO_EVAL, TokenCounter(), texts(list("ABCDE")), QUERIES, JUDGED)
    rows = {(json.loads(m)["relation"], json.loads(m)["group"]): ids
            for m, ids in zip(built.frame["meta"], built.frame["doc_ids"].to_list())}
    # q1: A (grade 3) before B (grade 2); C is not positive; q2: B and D tie on grade -> id order;
    # q3 has one positive -> nothing in context -> no row. Item B is positive for q2 (3) and q1 (2).
    assert rows == {
        ("items_by_query", "q1"): ["A", "B"],
        ("items_by_query", "q2"): ["B", "D"],
        ("queries_by_item", "B"): ["q2", "q1"],
    }
    row = built.frame.filter(pl.col("row_id") == "items_by_query:train:q1:0").row(0, named=True)
    assert row["documents"] == ["item A w", "item B w"]
    assert row["text"] == "item A w\n\nitem B w"  # documents joined by the separator, boundaries kept in `documents`
    assert json.loads(row["meta"])["n_tokens"] == 6


def test_in_context_co_click_from_search_logs_ranks_by_clicks():
    log = events([("u1", "A", "q1", 1), ("u2", "B", "q1", 2), ("u3", "B", "q1", 3), ("u4", "C", "q2", 4)])
    cfg = InContextCorpus(relations=["items_by_query"], max_tokens=100)
    built = build_in_context(cfg, NO_EVAL, TokenCounter(), texts(list("ABC")), None, None, log)
    assert built.frame["doc_ids"].to_list() == [["B", "A"]]  # B clicked twice for q1; q2 has one item


def test_in_context_packs_a_group_into_rows_under_max_tokens():
    # one query with 5 positive items of 3 tokens each; max 7 tokens -> [2 docs], [2 docs], [1 doc, dropped]
    judged = judgments_frame([Judgment("q", i, 3) for i in "ABCDE"])
    cfg = InContextCorpus(relations=["items_by_query"], max_tokens=7, min_docs=2)
    built = build_in_context(cfg, NO_EVAL, TokenCounter(), texts(list("ABCDE")), None, judged)
    assert built.frame["doc_ids"].to_list() == [["A", "B"], ["C", "D"]]
    assert all(json.loads(m)["n_tokens"] <= 7 for m in built.frame["meta"])
    one_doc = build_in_context(cfg.model_copy(update={"min_docs": 1}), NO_EVAL, TokenCounter(),
                                 texts(list("ABCDE")), None, judged)
    assert one_doc.frame["doc_ids"].to_list() == [["A", "B"], ["C", "D"], ["E"]]


def test_in_context_budget_in_real_tokenizer_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    counter = TokenCounter(TokenCountConfig(method="tokenizer", tokenizer=str(tiny_model_dir)))
    ids = list("ABCDEFGH")
    docs = pl.DataFrame({"id": ids, "text": [f"Title: a fairly long paperback novel about dragons, volume {i}" for i in ids]})
    judged = judgments_frame([Judgment("q", i, 3) for i in ids])
    cfg = InContextCorpus(relations=["items_by_query"], max_tokens=40, min_docs=1, separator="\n")
    built = build_in_context(cfg, NO_EVAL, counter, docs, None, judged)
    rows = built.frame.rows(named=True)
    assert len(rows) > 1 and [d for r in rows for d in r["doc_ids"]] == ids  # split across rows, order kept
    for r in rows:
        per_doc = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in r["documents"]]
        sep = len(tok("\n", add_special_tokens=False)["input_ids"])
        n = json.loads(r["meta"])["n_tokens"]
        assert n == sum(per_doc) + sep * (len(per_doc) - 1) <= 40


def test_in_context_user_sequence_keeps_time_order_and_holds_out_the_last_item():
    log = events([("u1", "C", None, 3), ("u1", "A", None, 1), ("u1", "B", None, 2), ("u1", "D", None, 4),
                  ("u2", "A", None, 1)])
    cfg = InContextCorpus(relations=["user_sequence"], max_tokens=100)
    built = build_in_context(cfg, SplitConfig(holdout_last=1), TokenCounter(), texts(list("ABCD")), None, None, log)
    frame = built.frame.sort("split", descending=True)
    assert frame.select("split", "doc_ids").rows() == [("train", ["A", "B", "C"]), ("eval", ["A", "B", "C", "D"])]
    leak = built.report["splits"]["user_sequence"]
    assert leak["eval_ids"] == 1 and leak["eval_ids_in_train"] == 0 and leak["ok"]
    # an eval row ends with the held-out item, preceded by as much recent history as fits
    short = build_in_context(cfg.model_copy(update={"max_tokens": 7}), SplitConfig(holdout_last=1), TokenCounter(),
                               texts(list("ABCD")), None, None, log)
    assert short.frame.filter(pl.col("split") == "eval")["doc_ids"].to_list() == [["C", "D"]]
    assert short.frame.filter(pl.col("split") == "train")["doc_ids"].to_list() == [["A", "B"]]  # C alone: dropped


def test_time_split_builds_train_rows_from_earlier_events_only():
    log = events([("u1", "A", "q1", 1), ("u2", "B", "q1", 2), ("u3", "C", "q1", 10), ("u4", "D", "q1", 11),
                  ("u1", "B", None, 3)])
    split = SplitConfig(by="time", time_cutoff=5)
    built = build_in_context(InContextCorpus(relations=["items_by_query"], max_tokens=100), split, TokenCounter(),
                               texts(list("ABCD")), None, None, log)
    assert built.frame.select("split", "doc_ids").sort("split", descending=True).rows() == [
        ("train", ["A", "B"]), ("eval", ["C", "D"])]
    leak = built.report["splits"]["items_by_query"]
    assert leak["method"] == "time (cutoff 5.0)" and leak["eval_ids"] == 2 and leak["ok"]
    # NoteLLM scores under a time split: u1's A, B (t <= 5) pair up in train; C, D (t > 5) are separate users
    scores, report = co_engagement_scores(log, ItemItemPairs(min_score=0.0), split)
    assert sorted(scores.select("split", "a", "b").rows()) == [("train", "A", "B"), ("train", "B", "A")]
    assert report["split"]["unit"] == "event (source line)" and report["split"]["ok"]


# ---------------------------------------------------------------- splits and the leakage check


def test_hash_split_is_deterministic_and_near_the_fraction():
    ids = [f"item-{i}" for i in range(5000)]
    a = split_frame(ids, "item", SplitConfig(salt="1"))
    b = split_frame(list(reversed(ids)), "item", SplitConfig(salt="1"))
    assert dict(a.iter_rows()) == dict(b.iter_rows())
    share = (a["split"] == "eval").mean()
    assert 0.18 < share < 0.22
    c = split_frame(ids, "item", SplitConfig(salt="2"))
    assert dict(a.iter_rows()) != dict(c.iter_rows())
    # the entity type is part of the key: a user and an item with the same id are split independently
    assert dict(a.iter_rows()) != dict(split_frame(ids, "user", SplitConfig(salt="1")).iter_rows())


def test_leakage_check_counts_eval_ids_seen_in_train():
    report = leakage_check(["a", "b", "b"], ["b", "c"], "item_id", "hash")
    assert report["eval_ids"] == 2 and report["eval_ids_in_train"] == 1 and report["leaked_examples"] == ["b"]
    assert report["ok"] is False
    assert leakage_check(["a"], ["c"], "item_id", "hash")["ok"] is True


def test_in_context_hash_split_never_puts_an_eval_item_in_a_train_row():
    ids = [f"i{n}" for n in range(60)]
    judged = judgments_frame([Judgment(f"q{n % 6}", i, 3) for n, i in enumerate(ids)])
    split = SplitConfig(eval_percent={"item": 30})
    built = build_in_context(InContextCorpus(relations=["items_by_query"], max_tokens=12), split, TokenCounter(),
                               texts(ids), None, judged)
    eval_ids = set(split_frame(ids, "item", split).filter(pl.col("split") == "eval")["id"])
    train_docs = set(built.frame.filter(pl.col("split") == "train")["doc_ids"].explode())
    eval_docs = set(built.frame.filter(pl.col("split") == "eval")["doc_ids"].explode())
    assert eval_ids and train_docs and eval_docs <= eval_ids
    assert not (train_docs & eval_ids)
    report = built.report["splits"]["items_by_query"]
    assert report["eval_ids_in_train"] == 0 and report["eval_ids"] == len(eval_docs)


def test_holdout_last_and_time_split():
    log = events([("u1", "A", None, 1), ("u1", "B", None, 2), ("u1", "C", None, 3), ("u2", "A", None, 5)])
    held = with_holdout_last(log, SplitConfig(holdout_last=1)).select("user_id", "item_id", "split").rows()
    # u2 has a single event: holding it out would leave no history, so it stays in train
    assert held == [("u1", "A", "train"), ("u1", "B", "train"), ("u1", "C", "eval"), ("u2", "A", "train")]
    timed, cutoff = with_time_split(log, SplitConfig(by="time", time_cutoff=2.5))
    assert cutoff == 2.5 and timed.filter(pl.col("split") == "eval")["item_id"].to_list() == ["C", "A"]


# ---------------------------------------------------------------- NoteLLM co-occurrence weights


def test_notellm_co_occurrence_weights_match_hand_computation():
    # u1 clicked A, B, C (3 items -> each pair gets 1/3); u2 clicked A, B (2 items -> 1/2); u2 repeats A.
    log = events([("u1", "A", None, 1), ("u1", "B", None, 2), ("u1", "C", None, 3),
                  ("u2", "A", None, 1), ("u2", "B", None, 2), ("u2", "A", None, 3)])
    scores, report = co_engagement_scores(log, ItemItemPairs(min_score=0.0, max_score=30), NO_EVAL)
    got = {(a, b): round(s, 6) for a, b, s in scores.select("a", "b", "score").iter_rows()}
    assert got == {
        ("A", "B"): round(1 / 3 + 1 / 2, 6), ("B", "A"): round(1 / 3 + 1 / 2, 6),
        ("A", "C"): round(1 / 3, 6), ("C", "A"): round(1 / 3, 6),
        ("B", "C"): round(1 / 3, 6), ("C", "B"): round(1 / 3, 6),
    }
    # the score range drops A-C and B-C (1/3 < 0.4); top_k=1 keeps each anchor's best neighbour
    kept, report = co_engagement_scores(log, ItemItemPairs(min_score=0.4, max_score=30), NO_EVAL)
    assert sorted(kept.select("a", "b").rows()) == [("A", "B"), ("B", "A")]
    assert report["pairs_before_filter"] == 6 and report["pairs_in_score_range"] == 2
    top1, _ = co_engagement_scores(log, ItemItemPairs(min_score=0.0, top_k=1), NO_EVAL)
    assert sorted(top1.select("a", "b").rows()) == [("A", "B"), ("B", "A"), ("C", "A")]  # C: tie A/B -> id order
    # window=1: only neighbours in time order co-occur, so A-C disappears
    win, _ = co_engagement_scores(log, ItemItemPairs(min_score=0.0, window=1), NO_EVAL)
    assert sorted({tuple(sorted(p)) for p in win.select("a", "b").rows()}) == [("A", "B"), ("B", "C")]
    # and a score above max_score is dropped too
    capped, _ = co_engagement_scores(log, ItemItemPairs(min_score=0.0, max_score=0.5), NO_EVAL)
    assert ("A", "B") not in set(capped.select("a", "b").rows())


def test_item_item_pairs_carry_weights_and_every_kept_positive():
    log = events([("u1", "A", None, 1), ("u1", "B", None, 2), ("u1", "C", None, 3),
                  ("u2", "A", None, 1), ("u2", "B", None, 2)])
    scores, _ = co_engagement_scores(log, ItemItemPairs(min_score=0.0), NO_EVAL)
    pairs = build_item_item_pairs(scores, texts(list("ABC"))).frame
    a_rows = pairs.filter(pl.col("anchor_id") == "A").sort("weight", descending=True)
    assert a_rows["positive_id"].to_list() == ["B", "C"]
    assert a_rows["weight"].round(6).to_list() == [round(5 / 6, 6), round(1 / 3, 6)]
    assert a_rows["anchor_positive_ids"].to_list() == [["B", "C"], ["B", "C"]]
    assert a_rows["anchor"].to_list() == ["item A w", "item A w"]


# ---------------------------------------------------------------- other pairs


def test_query_item_pairs_hard_negatives_are_never_positives_or_the_anchor():
    judged = judgments_frame([
        Judgment("q1", "A", 3), Judgment("q1", "B", 2), Judgment("q1", "C", 0), Judgment("q1", "D", 0),
        Judgment("q1", "q1", 0),  # an item sharing the query's id must not become its negative
        Judgment("q2", "A", 3),   # no judged-irrelevant item -> no negative
    ])
    queries = pl.DataFrame({"id": ["q1", "q2"], "text": ["Query: one", "Query: two"]})
    built = build_query_item_pairs(queries, judged, texts(["A", "B", "C", "D", "q1"]), QueryItemPairs(min_grade=2),
                                     NO_EVAL, seed=0)
    f = built.frame.sort("pair_id")
    assert f.select("anchor_id", "positive_id").rows() == [("q1", "A"), ("q1", "B"), ("q2", "A")]
    q1 = f.filter(pl.col("anchor_id") == "q1")
    assert q1["anchor_positive_ids"].to_list() == [["A", "B"], ["A", "B"]]
    assert set(q1["negative_id"]) <= {"C", "D"} and q1["negative"].to_list() == [f"item {n} w" for n in q1["negative_id"]]
    assert f.filter(pl.col("anchor_id") == "q2")["negative_id"].to_list() == [None]
    assert built.report["with_hard_negative"] == 2


def test_user_item_pairs_predict_the_next_item_from_the_history():
    items = [Item(i, {"title": f"Book {i}"}) for i in "ABCD"]
    log = events([("u1", "A", None, 1), ("u1", "B", None, 2), ("u1", "C", None, 3), ("u1", "D", None, 4)])
    built = build_user_item_pairs(log, items, texts(list("ABCD")), UserItemPairs(history_len=2), SplitConfig())
    rows = built.frame.sort("pair_id").select("anchor", "positive_id", "split", "anchor_positive_ids").rows()
    assert rows == [
        ("History: Book A", "B", "train", ["A", "B", "C"]),
        ("History: Book A | Book B", "C", "train", ["A", "B", "C"]),
        ("History: Book B | Book C", "D", "eval", ["A", "B", "C", "D"]),
    ]
    assert built.report["split"]["ok"] and built.report["split"]["eval_ids"] == 1


def test_tag_pairs_for_items_and_users():
    tags = pl.DataFrame({"item_id": ["A", "A", "A", "B"], "tag": ["to-read", "fantasy", "classic", "fantasy"],
                         "count": [90.0, 50.0, 40.0, 10.0], "rank": [0, 1, 2, 0]})
    items = [Item(i, {"title": f"Book {i}"}) for i in "AB"]
    log = events([("u1", "A", None, 1), ("u1", "B", None, 2)])
    built = build_tag_pairs(tags, texts(list("AB")), TagPairs(top_k=1, exclude=["to-read"]), NO_EVAL, log, items)
    f = built.frame
    assert f.filter(pl.col("kind") == "item_tag").select("anchor_id", "positive").sort("anchor_id").rows() == [
        ("A", "fantasy"), ("B", "fantasy")]
    user = f.filter(pl.col("kind") == "user_tag").row(0, named=True)
    assert (user["anchor"], user["positive"], user["weight"]) == ("History: Book A | Book B", "fantasy", 2.0)


# ---------------------------------------------------------------- reading and mix


def test_reading_joins_generated_features_and_counts_missing_items():
    features = pl.DataFrame({
        "entity_type": ["item", "item", "user"], "entity_id": ["A", "Z", "A"],
        "summary": ["A short summary.", "orphan", "a user"], "pseudo_queries": [["q one", "q two"], [], []],
        "knowledge": [None, None, None], "tags": [[], [], []],
    })
    built = build_reading(texts(list("AB")), features, ReadingCorpus(), NO_EVAL)
    row = built.frame.row(0, named=True)
    assert row["documents"] == ["item A w", "Summary: A short summary.", "Searches: q one; q two"]
    assert row["doc_ids"] == ["A", "A#summary", "A#pseudo_queries"]
    assert built.report["items_missing_features"] == 1 and built.report["features_without_item"] == 1


def test_mix_follows_weights_is_seeded_and_rejects_unknown_corpora():
    a = corpus_from_rows([dict(row_id=f"a{i}", source="a", documents=["x"], doc_ids=[f"a{i}"], text="x",
                                 split="train", meta="{}") for i in range(100)])
    r = replay_corpus([Query(f"g{i}", f"general text {i}") for i in range(10)], NO_EVAL)
    cfg = MixCorpus(enabled=True, weights={"a": 3, "replay": 1}, total_rows=40)
    one = mix_corpora({"a": a, "replay": r}, cfg, seed=5)
    assert one.frame["source"].value_counts().sort("source").rows() == [("a", 30), ("replay", 10)]
    assert one.report["ratios"]["replay"]["actual_fraction"] == 0.25
    assert one.frame["row_id"].to_list() == mix_corpora({"a": a, "replay": r}, cfg, seed=5).frame["row_id"].to_list()
    assert one.frame["source"].to_list() != sorted(one.frame["source"].to_list())  # interleaved, not stacked
    no_total = mix_corpora({"a": a, "replay": r}, cfg.model_copy(update={"total_rows": None}), seed=5)
    assert no_total.frame.height == 40 and not any(v["repeated"] for v in no_total.report["ratios"].values())
    with pytest.raises(RecforgeError, match="mix.weights.nope"):
        mix_corpora({"a": a}, MixCorpus(enabled=True, weights={"nope": 1}), seed=0)
