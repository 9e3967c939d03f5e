"""Issue 26: one implementation per concept; the stages call the core one (features table reader, model aliases)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from recforge.config import RecforgeError

ROWS = [
    {"entity_type": "item", "entity_id": "b1", "tags": ["space"], "summary": "A novel.", "pseudo_queries": ["sf"],
     "knowledge": "Setting: Mars"},
    {"entity_type": "user", "entity_id": "u1", "tags": [], "summary": None, "pseudo_queries": [], "knowledge": "Likes SF"},
]


def write_features(path: Path, rows=ROWS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recforge.records import features_schema

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=features_schema()), path)
    return path


def test_every_stage_reads_the_features_table_through_the_core_reader(tmp_path):
    from recforge.align.ctr.dense_inputs import knowledge_texts
    from recforge.data_recipes.build import read_features
    from recforge.features_table import read_features_table
    from recforge.readers import SourceConfig

    table = write_features(tmp_path / "export" / "features.parquet")
    assert read_features_table(str(table), "k") == ROWS
    assert read_features(SourceConfig(path=str(table))).to_dicts() == ROWS
    assert knowledge_texts(str(table.parent)) == {"item": {"b1": "Setting: Mars A novel. Tags: space"},
                                                  "user": {"u1": "Likes SF"}}


def test_jsonl_features_with_the_recipes_own_column_names(tmp_path):
    from recforge.data_recipes.build import read_features
    from recforge.readers import SourceConfig

    path = tmp_path / "features.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"sku": i, "blurb": f"item {i}", "tags": None}) for i in (1, 2)) + "\n")
    frame = read_features(SourceConfig(path=str(path), id="sku", fields={"summary": "blurb"}))
    assert frame["entity_id"].to_list() == ["1", "2"] and frame["summary"].to_list() == ["item 1", "item 2"]


@pytest.mark.parametrize("case,needle", [("missing", "file not found"), ("empty_folder", "no .parquet file"),
                                         ("not_parquet", "not a readable Parquet file"),
                                         ("no_entity_type", "no column 'entity_type'"),
                                         ("string_tags", "column 'tags' must be a list of strings")])
def test_a_bad_features_table_is_one_line_naming_the_key(tmp_path, case, needle):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recforge.features_table import features_table

    path = tmp_path / "features.parquet"
    if case == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "not_parquet":
        path.write_text("not parquet")
    elif case == "no_entity_type":
        pq.write_table(pa.table({"entity_id": ["b1"]}), path)
    elif case == "string_tags":
        pq.write_table(pa.table({"entity_type": ["item"], "entity_id": ["b1"], "tags": ["space"]}), path)
    with pytest.raises(RecforgeError, match=needle) as err:
        features_table(str(path), "inputs.knowledge", required=("entity_type", "entity_id"))
    assert str(err.value).startswith("inputs.knowledge: ") and "\n" not in str(err.value)


def test_tiny_resolves_through_the_core_alias_resolver(tiny_model_dir, tmp_path):
    import shutil

    from recforge.align.ctr.bahe import resolve_llm
    from recforge.align.pooling import resolve_backbone_path
    from recforge.models import resolve_model

    shutil.copytree(tiny_model_dir, tmp_path / "tiny-model")  # already built: resolved, not rebuilt
    assert resolve_model("tiny", tiny_root=tmp_path) == str(tmp_path / "tiny-model")
    assert resolve_backbone_path("tiny", str(tmp_path)) == tmp_path / "tiny-model"
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)  # a path is left as it is
    with pytest.raises(RecforgeError, match="model.llm.model: .* is not a model folder"):
        resolve_llm(str(tmp_path))


def test_align_reads_generate_runs_through_the_core_only():
    """A stage never imports another stage's internals: align reads generate runs through recforge.generations."""
    import re

    root = Path(__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root)}:{n}" for p in sorted((root / "align").rglob("*.py"))
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"recforge\.(generate|finetune)\b", line)]
    assert offenders == []
