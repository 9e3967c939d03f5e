"""`recforge data` without holding a corpus (issue 27, part 3): the column-wise Parquet log reader gives the core
reader's frame and rejects, the in-context corpus built in parts and streamed equals the one-frame build, the
streaming writer keeps `write_corpus`'s layout, and the mix made a bucket at a time equals the in-memory mix."""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.data_recipes import mix
from recforge.data_recipes.corpus_frames import CORPUS_COLUMNS, corpus_from_rows
from recforge.data_recipes.corpus_io import CorpusWriter
from recforge.data_recipes.event_logs import hash_chunks
from recforge.data_recipes.in_context import build_in_context, build_in_context_stream
from recforge.data_recipes.lazy_read import read_interactions as lazy_read
from recforge.data_recipes.mix import mix_corpora, write_mix
from recforge.data_recipes.output_layout import write_corpus
from recforge.data_recipes.recipe_config import InContextCorpus, MixCorpus
from recforge.data_recipes.serialize import TokenCounter
from recforge.data_recipes.splits import SplitConfig
from recforge.readers import RejectLog, SourceConfig, read_interactions as core_read
from recforge.rejects import DataError
from recforge.records import corpus_schema

FIELDS = {"user_id": "user", "item_id": "item", "query_id": "query", "timestamp": "ts", "event": "ev",
          "label": "lab", "weight": "w"}


def messy_log(path) -> None:
    """Clean rows and one of each kind of row the column checks leave to the row rules (good or rejected)."""
    rows = [  # user, item, query, ts, ev, lab, w
        ("u1", "i1", 1, 1.0, "click", 1, 1.0),
        (" u2 ", "i2", None, 2.0, None, None, None),      # padded id: stripped by the row rules, kept
        ("", "i3", 2, 3.0, "click", None, None),            # empty user: missing_id
        (None, "i3", 2, 3.0, "click", None, None),          # no user: missing_id
        ("u3", "", 5, 4.0, "", None, None),                 # empty item (the query does not save it): missing_id
        ("u3", None, None, 5.0, "buy", None, None),         # neither id: missing_id
        ("u3", None, 7, 6.0, "", 0, 2.0),                   # a query alone is enough; "" event -> the default
        ("u4", "i4", 8, math.nan, "click", None, None),     # NaN timestamp: wrong_type
        ("u4", "i4", 8, math.inf, "click", None, None),     # infinite timestamp: wrong_type
        ("u5", "i5", 9, 7.0, "click", None, -math.inf),     # infinite weight: wrong_type
        ("ü", "i6", 9, 8.0, "click", 1, 1.0),               # non-ASCII id: the row rules keep it as it is
        ("a\x1f", "i7 ", 3, 9.0, "click", 1, 1.0),          # str.strip() drops \x1f and the space
        ("u6", "i8", 4, None, None, None, None),            # no timestamp: fine
    ]
    cols = list(zip(*rows))
    pq.write_table(pa.table({
        "user": pa.array(cols[0], pa.string()), "item": pa.array(cols[1], pa.string()),
        "query": pa.array(cols[2], pa.int64()), "ts": pa.array(cols[3], pa.float64()),
        "ev": pa.array(cols[4], pa.string()), "lab": pa.array(cols[5], pa.int64()),
        "w": pa.array(cols[6], pa.float64()), "extra": pa.array([f"x{i}" for i in range(len(rows))]),
    }), path)


def both(src: SourceConfig):
    core_rejects, lazy_rejects = RejectLog(), RejectLog()
    return core_read(src, core_rejects), lazy_read(src, lazy_rejects), core_rejects, lazy_rejects


def test_the_column_wise_reader_gives_the_core_readers_frame_and_rejects(tmp_path):
    messy_log(tmp_path / "log.parquet")
    src = SourceConfig(path=str(tmp_path / "log.parquet"), fields=FIELDS, event="view")
    core, lazy, core_rejects, lazy_rejects = both(src)
    assert core.height == 6 and core_rejects.total == 7
    assert lazy.equals(core) and lazy.schema == core.schema
    assert lazy_rejects.kept == core_rejects.kept  # same lines, reasons, details and raw rows, in line order
    assert lazy_rejects.counts == core_rejects.counts
    # strict: the same first bad row stops both
    with pytest.raises(DataError) as core_err:
        core_read(src, RejectLog(strict=True))
    with pytest.raises(DataError) as lazy_err:
        lazy_read(src, RejectLog(strict=True))
    assert str(lazy_err.value) == str(core_err.value)


def test_what_the_column_wise_reader_does_not_handle_is_the_core_readers(tmp_path):
    # a text timestamp, a CSV log, a log with no plainly valid row: the core reader reads it, its way
    pq.write_table(pa.table({"user_id": ["1", "2"], "item_id": ["a", "b"], "ts": ["2024-01-01T00:00:00", "3"]}),
                   tmp_path / "text_ts.parquet")
    (tmp_path / "log.csv").write_text("user_id,item_id,ts\n1,a,1\n,b,2\n")
    pq.write_table(pa.table({"user_id": ["", None], "item_id": ["a", "b"], "ts": [1.0, 2.0]}), tmp_path / "bad.parquet")
    for name in ("text_ts.parquet", "log.csv"):
        core, lazy, core_rejects, lazy_rejects = both(SourceConfig(path=str(tmp_path / name), fields={"timestamp": "ts"}))
        assert lazy.equals(core) and lazy_rejects.kept == core_rejects.kept
    src = SourceConfig(path=str(tmp_path / "bad.parquet"), fields={"timestamp": "ts"})
    with pytest.raises(Exception) as core_err:
        core_read(src, RejectLog())
    with pytest.raises(Exception) as lazy_err:
        lazy_read(src, RejectLog())
    assert str(lazy_err.value) == str(core_err.value) and "no usable rows" in str(core_err.value)


def synthetic_log(n_users: int = 400, per_user: int = 12) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """A search log (events as `read_interactions` returns them), item texts and query texts."""
    users, items, queries, ts = [], [], [], []
    for u in range(n_users):
        for k in range(per_user):
            users.append(f"u{u}")
            items.append(f"i{(u * 7 + k * k) % 90}")
            queries.append(f"q{(u + k) % 25}" if k % 3 else None)
            ts.append(float(u * 100 + k))
    n = len(users)
    events = pl.DataFrame({
        "user_id": users, "item_id": items, "query_id": queries, "event": ["click"] * n, "timestamp": ts,
        "label": [None] * n, "weight": [None] * n, "line": list(range(1, n + 1)),
    }, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "query_id": pl.Utf8, "event": pl.Utf8,
               "timestamp": pl.Float64, "label": pl.Float64, "weight": pl.Float64, "line": pl.Int64})
    item_texts = pl.DataFrame({"id": [f"i{i}" for i in range(90)], "text": [f"item {i} " + "w " * (i % 9) for i in range(90)]})
    query_texts = pl.DataFrame({"id": [f"q{i}" for i in range(25)], "text": [f"query {i}" for i in range(25)]})
    return events, item_texts, query_texts


def test_in_context_built_in_parts_and_streamed_equals_the_one_frame_build():
    events, item_texts, query_texts = synthetic_log()
    split = SplitConfig.uniform(20)
    relations = ["items_by_query", "queries_by_item", "user_sequence"]
    whole_cfg = InContextCorpus(relations=relations, max_tokens=40, max_docs=6, chunk_rows=10**9)
    parts_cfg = whole_cfg.model_copy(update={"chunk_rows": 1000})  # 4800 events: 5 ranges of users
    whole = build_in_context(whole_cfg, split, TokenCounter(), item_texts, query_texts, None, events)
    parts = build_in_context(parts_cfg, split, TokenCounter(), item_texts, query_texts, None, events)
    assert whole.frame.height > 500
    assert parts.frame.equals(whole.frame)  # same rows, same order
    for report in (whole.report, parts.report):
        for rep in report["splits"].values():
            rep.pop("leaked_examples")
    assert parts.report == whole.report
    stream = build_in_context_stream(parts_cfg, split, TokenCounter(), item_texts, query_texts, None, events)
    batches = list(stream.batches)
    assert len(batches) > 5  # the user sequences came a range of users at a time
    streamed = pl.concat(batches)
    for name in ("train", "eval"):  # per split, the order `write_corpus(frame)` writes
        assert streamed.filter(pl.col("split") == name).equals(whole.frame.filter(pl.col("split") == name))


def test_the_streaming_writer_keeps_the_layout_and_clears_a_killed_runs_temporaries(tmp_path):
    rows = corpus_from_rows([dict(row_id=f"r{i}", source="s", documents=[f"d{i}"], doc_ids=[f"{i}"], text=f"t{i}",
                                    split="eval" if i % 4 == 0 else "train", meta="{}") for i in range(53)])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".train-00000.parquet.tmp").write_text("left by a killed run")
    (tmp_path / "c" / "train-00007-of-00009.parquet").write_text("an old shard")
    writer = CorpusWriter(tmp_path, "c", corpus_schema(), CORPUS_COLUMNS, 10, "corpus")
    for start, size in ((0, 3), (3, 17), (20, 1), (21, 32)):
        writer.write(rows.slice(start, size))
    written = writer.close()
    assert written["rows"] == {"train": 39, "eval": 14}
    assert written["files"]["train"] == [f"c/train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        [f"train-{i:05d}-of-00004.parquet" for i in range(4)] + ["eval-00000-of-00002.parquet", "eval-00001-of-00002.parquet"])
    assert [pq.read_metadata(tmp_path / f).num_rows for f in written["files"]["train"]] == [10, 10, 10, 9]
    for name in ("train", "eval"):
        back = pl.read_parquet([tmp_path / f for f in written["files"][name]])
        assert back.equals(rows.filter(pl.col("split") == name))
    # the same rows as one frame: the same files
    one = write_corpus(rows, tmp_path / "one", "c", 10)
    assert [f.replace("one/", "") for f in one["files"]["train"]] == written["files"]["train"]


def test_the_mix_written_a_bucket_at_a_time_equals_the_in_memory_mix(tmp_path, monkeypatch):
    def corpus(prefix: str, n: int) -> pl.DataFrame:
        return corpus_from_rows([dict(row_id=f"{prefix}{(i * 37) % n:04d}", source=prefix, documents=[f"{prefix}{i}"],
                                        doc_ids=[f"{i}"], text=f"{prefix} {i}", split="train" if i % 5 else "eval",
                                        meta="{}") for i in range(n)])

    corpora = {"a": corpus("a", 230), "b": corpus("b", 40)}
    files = {name: [tmp_path / f for f in write_corpus(frame, tmp_path, name, 50)["files"]["train"]]
             for name, frame in corpora.items()}
    monkeypatch.setattr(mix, "BUCKET_ROWS", 7)  # many buckets for a small mix
    for cfg in (MixCorpus(enabled=True, weights={"a": 2, "b": 1}),
                MixCorpus(enabled=True, weights={"a": 1, "b": 3}, total_rows=150)):  # b repeats rows
        expected = mix_corpora(corpora, cfg, seed=3)
        written = write_mix(files, tmp_path, cfg, 3, 60)
        got = pl.read_parquet([tmp_path / f for f in written["files"]["train"]])
        assert got.equals(expected.frame)
        assert written["report"] == expected.report
        assert not list(tmp_path.glob(".mix-*"))  # the buckets are gone


def test_hash_chunks_come_one_at_a_time_as_partition_by_would_give_them():
    frame = pl.DataFrame({"key": [f"k{(i * 7) % 23}" for i in range(500)], "i": list(range(500))})
    n = 5  # chunk_rows 100
    expected = frame.with_columns((pl.col("key").hash(seed=17) % n).alias("_c")).partition_by("_c", maintain_order=True)
    got = list(hash_chunks(frame, "key", 100))
    assert len(got) == len(expected)
    for part, want in zip(got, expected):
        assert part.equals(want.drop("_c"))
