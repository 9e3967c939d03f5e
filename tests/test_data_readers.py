"""Readers: field mapping across formats, and bad input quarantined with file, line and reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.config import RecforgeError
from recforge.rejects import DataError
from recforge.data_recipes.readers import (
    RejectLog,
    SourceConfig,
    read_interactions,
    read_items,
    read_judgments,
    read_queries,
)

GOOD_ITEMS = [
    {"sku": "A1", "name": "Wireless earbuds", "brand": "Sonic", "tags": ["audio", "bluetooth"], "price": 19.5},
    {"sku": 2, "name": "USB-C cable", "brand": "Linkr", "tags": [], "price": 5},
    {"sku": "A3", "name": "  Desk lamp  ", "brand": None, "tags": ["home"], "price": None},
]


def write_messy_items(path):
    """One good row, then one row per kind of malformed input, then more good rows. Returns {line: reason}."""
    lines = [
        json.dumps(GOOD_ITEMS[0]).encode(),                                        # 1 good
        b'{"sku": "B1", "name": "broken json"',                                    # 2 invalid_json
        b'["not", "an", "object"]',                                                # 3 invalid_json
        b'{"sku": "B2", "name": "caf\xe9 latte"}',                                 # 4 bad_utf8
        json.dumps({"name": "no id here"}).encode(),                               # 5 missing_id
        json.dumps({"sku": "B3", "name": {"nested": "dict"}}).encode(),            # 6 wrong_type
        json.dumps({"sku": "B4", "name": "   ", "brand": None}).encode(),          # 7 empty_text
        json.dumps({"sku": "A1", "name": "Different earbuds", "brand": "X"}).encode(),  # 8 conflicting_duplicate
        json.dumps({"sku": "B5", "name": "x" * 300}).encode(),                     # 9 field_too_long
        json.dumps(GOOD_ITEMS[1]).encode(),                                        # 10 good
        json.dumps(GOOD_ITEMS[0]).encode(),                                        # 11 identical duplicate: kept once
        b"",                                                                       # 12 blank line: no row
        json.dumps(GOOD_ITEMS[2]).encode(),                                        # 13 good
    ]
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return {2: "invalid_json", 3: "invalid_json", 4: "bad_utf8", 5: "missing_id", 6: "wrong_type",
            7: "empty_text", 8: "conflicting_duplicate", 9: "field_too_long"}


def items_source(path, **kw):
    return SourceConfig(path=str(path), id="sku", fields={"title": "name", "brand": "brand", "tags": "tags",
                                                          "price": "price"}, max_field_chars=200, **kw)


def test_every_malformed_row_is_quarantined_with_line_and_reason(tmp_path):
    path = tmp_path / "items.jsonl.gz"
    expected = write_messy_items(path)
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    items = read_items(items_source(path), rejects)
    rejects.close()

    logged = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reason"] for r in logged} == expected
    assert all(r["file"] == str(path) and r["detail"] and r["raw"] for r in logged)
    assert "caf\\xe9" in next(r["raw"] for r in logged if r["reason"] == "bad_utf8")  # raw bytes kept, escaped
    assert rejects.counts["invalid_json"] == 2 and rejects.total == 8
    assert rejects.notes["duplicate_identical"] == 1

    # every good row is in the output, once, with ids as strings and fields typed
    assert [i.item_id for i in items] == ["A1", "2", "A3"]
    assert items[0].fields == {"title": "Wireless earbuds", "brand": "Sonic", "tags": ["audio", "bluetooth"], "price": 19.5}
    assert items[1].fields == {"title": "USB-C cable", "brand": "Linkr", "price": 5}  # empty list = absent
    assert items[2].fields == {"title": "Desk lamp", "tags": ["home"]}


def test_strict_stops_at_first_reject_naming_file_line_reason(tmp_path):
    path = tmp_path / "items.jsonl.gz"
    write_messy_items(path)
    with pytest.raises(DataError, match=r"items\.jsonl\.gz:2: invalid_json"):
        read_items(items_source(path), RejectLog(strict=True))
    # strict on a list of reasons: other reasons are still quarantined
    with pytest.raises(DataError, match=r":5: missing_id"):
        read_items(items_source(path), RejectLog(strict=["missing_id"]))


def test_csv_and_parquet_map_the_same_schema(tmp_path):
    csv_path = tmp_path / "items.csv"
    csv_path.write_text(
        "sku,name,brand,tags\n"
        "A1,Wireless earbuds,Sonic,audio|bluetooth\n"
        "A2,only three,cols\n"             # line 3: too few columns
        "A3,\"Lamp, desk\",Lumo,home\n"
        ",no id,X,y\n",                    # line 5: missing id
        encoding="utf-8",
    )
    rejects = RejectLog()
    src = SourceConfig(path=str(csv_path), id="sku", fields={"title": "name", "brand": "brand", "tags": "tags"},
                       list_separators={"tags": "|"})
    items = read_items(src, rejects)
    assert [(i.item_id, i.fields["title"]) for i in items] == [("A1", "Wireless earbuds"), ("A3", "Lamp, desk")]
    assert items[0].fields["tags"] == ["audio", "bluetooth"]
    assert [(r["line"], r["reason"]) for r in rejects.kept] == [(3, "bad_csv_row"), (5, "missing_id")]

    pq_path = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist([{"sku": "A1", "name": "Wireless earbuds", "n": 3},
                                         {"sku": None, "name": "nameless", "n": 1}]), pq_path)
    rejects = RejectLog()
    items = read_items(SourceConfig(path=str(pq_path), id="sku", fields={"title": "name"}), rejects)
    assert [i.item_id for i in items] == ["A1"] and [r["line"] for r in rejects.kept] == [2]


def test_a_mapped_column_the_file_lacks_is_a_recipe_error_naming_the_key(tmp_path):
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("sku,name\nA1,x\n", encoding="utf-8")
    with pytest.raises(RecforgeError, match=r"inputs\.products\.fields\.title: column 'product_title' is not in"):
        read_items(SourceConfig(path=str(csv_path), id="sku", fields={"title": "product_title"}), RejectLog(),
                   name="inputs.products")
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"sku": "A1", "name": "x"}\n', encoding="utf-8")
    with pytest.raises(RecforgeError, match="fields.title: column 'titel'"):
        read_items(SourceConfig(path=str(jsonl), id="sku", fields={"title": "titel"}), RejectLog())
    with pytest.raises(RecforgeError, match="inputs.x.path: file not found"):
        read_items(SourceConfig(path=str(tmp_path / "nope.jsonl"), id="sku"), RejectLog(), name="inputs.x")


def test_interactions_frame_keeps_every_event_and_quarantines_bad_rows(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [
        {"uid": 7, "book": 10, "t": "2024-01-02T03:04:05Z", "stars": 5},
        {"uid": 7, "book": 10, "t": 1704165000, "stars": 4},     # repeat event: kept
        {"uid": 8, "t": 5, "stars": 3},                            # line 3: no item
        {"uid": 8, "book": 11, "t": "yesterday", "stars": 3},     # line 4: bad timestamp
        {"uid": 8, "book": 12, "t": 6, "stars": "five"},          # line 5: bad label
        {"uid": 9, "book": 12.0, "t": 7, "stars": "2"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    rejects = RejectLog()
    frame = read_interactions(
        SourceConfig(path=str(path), fields={"user_id": "uid", "item_id": "book", "timestamp": "t", "label": "stars"}),
        rejects)
    assert frame["user_id"].to_list() == ["7", "7", "9"]
    assert frame["item_id"].to_list() == ["10", "10", "12"]
    assert frame["timestamp"].to_list()[0] == 1704164645.0
    assert frame["label"].to_list() == [5.0, 4.0, 2.0]
    assert frame["line"].to_list() == [1, 2, 6]
    assert [(r["line"], r["reason"]) for r in rejects.kept] == [(3, "missing_id"), (4, "wrong_type"), (5, "wrong_type")]


def test_queries_and_judgments_on_the_shipped_esci_sample():
    rejects = RejectLog()
    queries = read_queries(SourceConfig(path="sample://esci_us_titles/queries.jsonl.gz", id="query_id",
                                        fields={"text": "query"}), rejects)
    judgments = read_judgments(SourceConfig(path="sample://esci_us_titles/judgments.jsonl.gz",
                                            fields={"item_id": "product_id", "grade": "esci_label"},
                                            grade_map={"E": 3, "S": 2, "C": 1, "I": 0}), rejects)
    assert rejects.total == 0
    assert len(queries) == 350 and len({q.query_id for q in queries}) == 350
    assert len(judgments) == 790 and {j.grade for j in judgments} == {0.0, 1.0, 2.0, 3.0}
    assert {j.query_id for j in judgments} <= {q.query_id for q in queries}


# ---------------------------------------------------------------- defects found by feeding bad input (issue 12)


def test_csv_quoted_field_keeps_its_newline(tmp_path):
    """A quoted CSV field spanning lines keeps the line break (the reader used to strip line ends first)."""
    csv_path = tmp_path / "items.csv"
    csv_path.write_bytes(b'sku,name,notes\r\nA1,"Desk lamp","warm light\r\nfor reading"\r\nA2,Cable,plain\r\n')
    rejects = RejectLog()
    items = read_items(SourceConfig(path=str(csv_path), id="sku", fields={"title": "name", "notes": "notes"}), rejects)
    assert rejects.total == 0
    assert [i.fields["notes"] for i in items] == ["warm light\r\nfor reading", "plain"]
    tsv = tmp_path / "items.tsv"
    tsv.write_text('sku\tname\nB1\t"two\nlines"\n', encoding="utf-8")
    assert read_items(SourceConfig(path=str(tsv), id="sku", fields={"title": "name"}), RejectLog())[0].fields["title"] == "two\nlines"


def test_a_number_where_the_title_belongs_is_wrong_type_not_empty_text(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"sku": "A1", "name": "Lamp"}, {"sku": "A2", "name": 1984}, {"sku": "A3", "name": "  "}]) + "\n", encoding="utf-8")
    rejects = RejectLog()
    items = read_items(SourceConfig(path=str(path), id="sku", fields={"title": "name"}), rejects)
    assert [i.item_id for i in items] == ["A1"]
    assert [(r["line"], r["reason"]) for r in rejects.kept] == [(2, "wrong_type"), (3, "empty_text")]
    assert "'title' holds a number" in rejects.kept[0]["detail"]


def test_a_file_with_no_usable_row_is_one_error_naming_file_and_first_bad_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"sku": \nnot json\n', encoding="utf-8")
    with pytest.raises(RecforgeError, match=r"inputs\.items\.path: .*items\.jsonl: no usable rows.*line 1, invalid_json"):
        read_items(SourceConfig(path=str(path), id="sku"), RejectLog(), "inputs.items")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(RecforgeError, match="empty.csv: no usable rows, it holds no rows"):
        read_items(SourceConfig(path=str(tmp_path / "empty.csv"), id="sku"), RejectLog(), "inputs.items")


def test_read_records_keeps_nested_values_and_quarantines_wrong_kinds(tmp_path):
    from recforge.readers import read_records

    path = tmp_path / "books.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"book_id": 1, "title": "Dune", "tags": [{"tag_name": "sf", "count": 3}, "classic"]},
        {"book_id": 2, "title": 7, "tags": []},                          # line 2: a number as the title
        {"book_id": 3, "title": "Emma", "tags": "romance"},              # line 3: tags not a list
        {"title": "no id", "tags": []},                                  # line 4: missing id
    ]) + "\n", encoding="utf-8")
    rejects = RejectLog()
    rows = read_records(SourceConfig(path=str(path), id="book_id"), rejects, "books", {"title": "text", "tags": "tags"})
    assert rows == [("1", {"book_id": 1, "title": "Dune", "tags": [{"tag_name": "sf", "count": 3.0},
                                                                   {"tag_name": "classic", "count": 1.0}]})]
    assert [(r["line"], r["reason"]) for r in rejects.kept] == [(2, "wrong_type"), (3, "wrong_type"), (4, "missing_id")]


def test_the_old_import_path_is_the_same_module():
    import recforge.data_recipes.readers as old
    import recforge.readers as core

    assert old is core and old.read_items is core.read_items
