"""Issue 23, readers / recipes / models / embed: hostile input is one line or a named reject, never a traceback,
a silent loss or a half-done output taken for done.

The command-level cases (exit 2, one line) are in the bad-input matrix, tests/test_cli_bad_input.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recforge.config import RecforgeError
from recforge.readers import RejectLog, SourceConfig, read_interactions, read_items, read_judgments, read_records

REPO = Path(__file__).resolve().parents[1]
RECFORGE = [sys.executable, "-m", "recforge"]


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """The sha256 cache of recforge.fingerprint stays out of the home folder (subprocesses inherit it)."""
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return path


# ---------------------------------------------------------------- broken files


def test_truncated_gzip_is_one_error_naming_the_file(tmp_path):
    full = gzip.compress("".join(json.dumps({"sku": i, "title": f"item {i} " * 20}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "items.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(RecforgeError, match=r"items\.jsonl\.gz: not a readable jsonl \(gzip\) file"):
        read_items(SourceConfig(path=str(path), id="sku"), RejectLog())
    csv_path = tmp_path / "items.csv.gz"
    csv_path.write_bytes(gzip.compress(("sku,title\n" + "".join(f"{i},item {i}\n" for i in range(5000))).encode())[:300])
    with pytest.raises(RecforgeError, match=r"items\.csv\.gz: not a readable csv \(gzip\) file"):
        read_items(SourceConfig(path=str(csv_path), id="sku"), RejectLog())


def test_a_file_named_parquet_that_is_not_parquet_is_one_error(tmp_path):
    path = write_jsonl(tmp_path / "items.parquet", [{"sku": 1, "title": "Dune"}])
    with pytest.raises(RecforgeError, match=r"items\.parquet: not a readable parquet file"):
        read_items(SourceConfig(path=str(path), id="sku"), RejectLog())


# ---------------------------------------------------------------- binary ids, BOMs, reasons, time zones


def binary_id_parquet(path: Path, ids: list[bytes], titles: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"product_id": pa.array(ids, pa.binary()), "product_title": titles}), path)
    return path


def test_binary_parquet_ids_are_decoded_or_rejected_with_a_reason(tmp_path):
    path = binary_id_parquet(tmp_path / "p.parquet", [b"B01", "Čaj".encode(), b"\xff\xfe"], ["a", "b", "c"])
    rejects = RejectLog()
    items = read_items(SourceConfig(path=str(path), id="product_id"), rejects)
    assert [i.item_id for i in items] == ["B01", "Čaj"]  # not "b'B01'"
    assert [(r["line"], r["reason"]) for r in rejects.kept] == [(3, "invalid_id")]


def test_binary_id_catalogue_still_joins_the_judgments(tmp_path):
    """The ESCI recipe with its products as Parquet whose id column is binary: before, every product id was
    `b'...'`, no judgment joined, and the query-item and pair corpora were written with 0 rows, exit 0."""
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in gzip.open(REPO / "data_recipes/samples/esci_us_titles/products.jsonl.gz", "rt")]
    products = binary_id_parquet(tmp_path / "products.parquet", [r["product_id"].encode() for r in rows],
                                 [r["product_title"] for r in rows])
    out = tmp_path / "out"
    proc = subprocess.run([*RECFORGE, "data", str(REPO / "data_recipes/recipes/esci_search.yaml"), f"out_dir={out}",
                           f"inputs.items.path={products}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = {o["name"]: o["rows"] for o in json.loads((out / "manifest.json").read_text())["outputs"]}
    assert outputs["query_item"] > 100 and outputs["pairs"] > 100, outputs
    doc_ids = [d for ids in pq.read_table(out / "items").column("doc_ids").to_pylist() for d in ids]
    assert doc_ids and not any(d.startswith("b'") for d in doc_ids)


def test_a_byte_order_mark_costs_no_row_and_no_header(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = write_jsonl(tmp_path / "items.jsonl", [{"sku": 1, "title": "Dune"}, {"sku": 2, "title": "Emma"}], bom)
    rejects = RejectLog()
    assert [i.item_id for i in read_items(SourceConfig(path=str(jsonl), id="sku"), rejects)] == ["1", "2"]
    assert rejects.total == 0
    csv_path = tmp_path / "items.csv.gz"
    csv_path.write_bytes(gzip.compress(bom + b"sku,title\n1,Dune\n"))
    assert [i.item_id for i in read_items(SourceConfig(path=str(csv_path), id="sku", fields={"title": "title"}),
                                          RejectLog())] == ["1"]
    from recforge.io import open_text

    with open_text(jsonl) as f:
        assert json.loads(f.readline()) == {"sku": 1, "title": "Dune"}


def test_a_missing_grade_or_number_has_its_own_reason_not_missing_id(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", [{"query_id": "q", "item_id": "a", "grade": 3}, {"query_id": "q", "item_id": "b"}])
    rejects = RejectLog()
    assert len(read_judgments(SourceConfig(path=str(path)), rejects)) == 1
    assert [(r["reason"], r["detail"]) for r in rejects.kept] == [("missing_field", "grade is absent")]
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "year": 1965}, {"id": 2}])
    rejects = RejectLog()
    read_records(SourceConfig(path=str(path), id="id"), rejects, "books", {"year": "number"})
    assert [r["reason"] for r in rejects.kept] == ["missing_field"]


@pytest.fixture
def tokyo_time(monkeypatch):
    """The process runs in a non-UTC zone (UTC+9), as on a laptop in Tokyo."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_naive_timestamps_are_utc_whatever_the_machine_zone(tmp_path, tokyo_time):
    assert time.localtime(0).tm_hour == 9  # the zone really is in effect
    path = write_jsonl(tmp_path / "events.jsonl", [
        {"user_id": "u", "item_id": "a", "ts": "2024-01-01T00:00:00"},        # naive: UTC
        {"user_id": "u", "item_id": "b", "ts": "2024-01-01T09:00:00+09:00"},  # explicit offset: kept
        {"user_id": "u", "item_id": "c", "ts": "2024-01-01T00:00:00Z"},
    ])
    frame = read_interactions(SourceConfig(path=str(path), fields={"timestamp": "ts"}), RejectLog())
    assert frame["timestamp"].to_list() == [1704067200.0] * 3


# ---------------------------------------------------------------- YAML bounds


def bomb(levels: int = 9) -> str:
    parts = ["&l0 [" + ", ".join(["x"] * 10) + "]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_yaml_alias_bomb_is_refused_before_anything_walks_it(tmp_path):
    from recforge.config import load_recipe, read_recipe_file
    from recforge.generate.generate_config import GenerateConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(f"task: shelf_tags\nprompt_vars: {{taxonomy: {bomb()}}}\n")
    started = time.monotonic()
    with pytest.raises(RecforgeError, match="recipe.yaml: the YAML expands to more than") as info:
        load_recipe(GenerateConfig, path)
    assert time.monotonic() - started < 5 and len(str(info.value)) < 300
    with pytest.raises(RecforgeError, match="override prompt_vars.taxonomy: the YAML expands"):
        load_recipe(GenerateConfig, None, [f"prompt_vars.taxonomy={bomb()}"])
    path.write_text("a: &a [1, *a]\n")  # a structure that contains itself
    with pytest.raises(RecforgeError, match="contains itself"):
        load_recipe(GenerateConfig, path)
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"task: shelf_tags\nprompt_vars: {{taxonomy: {bomb(4)}}}\n")  # 11,110 values: an honest size
    assert len(read_recipe_file(ok)["prompt_vars"]["taxonomy"]) == 4


def test_yaml_files_are_bounded_in_size(tmp_path, monkeypatch):
    import recforge.config as config

    monkeypatch.setattr(config, "MAX_YAML_BYTES", 1000)
    path = tmp_path / "big.yaml"
    path.write_text("notes: " + "x" * 2000 + "\n")
    with pytest.raises(RecforgeError, match=r"big\.yaml: 2,008 bytes, more than the 1,000"):
        config.read_recipe_file(path)


def test_a_validation_error_shows_a_bounded_value():
    """The error line's `(got ...)` must not repr the whole value: the repr of a shared-reference structure is
    its expanded size (here 1e9 strings)."""
    from pydantic import BaseModel, ValidationError

    from recforge.config import format_validation_error

    class Recipe(BaseModel):
        fields: str

    level = ["x"] * 10
    for _ in range(8):
        level = [level] * 10
    with pytest.raises(ValidationError) as info:
        Recipe.model_validate({"fields": level})
    started = time.monotonic()
    line = format_validation_error(info.value, "r.yaml")
    assert time.monotonic() - started < 1 and len(line) < 300 and "key 'fields'" in line


# ---------------------------------------------------------------- models: safetensors only, no remote code


@pytest.fixture(scope="module")
def pickle_only_encoder(tmp_path_factory, minilm_dir):
    """The real MiniLM encoder with its weights saved as a pickle (`pytorch_model.bin`) instead of safetensors:
    it loads (torch's weights_only) and embedded, exit 0, before."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle-encoder") / "model"
    shutil.copytree(minilm_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def small_catalogue(path: Path, n: int, offset: int = 0, bad: bool = False) -> Path:
    rows = []
    with gzip.open(REPO / "data_recipes/samples/goodbooks_10k_catalog/books.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            if i >= offset:
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    text = "".join(json.dumps(r) + "\n" for r in rows) + ("{not json\n" if bad else "")
    path.write_text(text)
    return path


def embed_cmd(out: Path, catalogue: Path, model: str | Path, *extra: str) -> list[str]:
    return [*RECFORGE, "embed", str(REPO / "align/recipes/embed_goodbooks.yaml"), f"model={model}", f"out_dir={out}",
            f"catalogue.path={catalogue}", "shard_size=4", "faiss_index=false", *extra]


def test_embed_and_eval_retrieval_refuse_a_pickle_only_encoder(tmp_path, pickle_only_encoder):
    from recforge.align.align_config import RetrievalEvalConfig
    from recforge.align.evaluate import run_eval_retrieval

    out = tmp_path / "out"
    proc = subprocess.run(embed_cmd(out, small_catalogue(tmp_path / "c.jsonl", 4), pickle_only_encoder),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "pickle files only (pytorch_model.bin)" in proc.stderr and str(pickle_only_encoder) in proc.stderr
    assert not (out / "shards").exists() and not (out / "manifest.json").exists()
    cfg = RetrievalEvalConfig(out_dir=str(tmp_path / "eval"), models={"tuned": str(pickle_only_encoder)})
    with pytest.raises(RecforgeError, match=r"models\.tuned .*pickle files only"):
        run_eval_retrieval(cfg)
    assert not (tmp_path / "eval" / "manifest.json").exists()


def test_unknown_model_type_asking_for_remote_code_is_refused_naming_the_folder(tmp_path):
    from recforge.models import require_known_architecture

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(RecforgeError, match=f"model {folder}: .*'evilnet'.*trust_remote_code is off"):
        require_known_architecture(folder, "model")
    require_known_architecture(folder, "model", trust_remote_code=True)  # the user's explicit choice
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    require_known_architecture(folder, "model")  # a known architecture: transformers' own code is used
    (folder / "modules.json").write_text(json.dumps([{"path": "", "type": "evil_module.Encoder"}]))
    with pytest.raises(RecforgeError, match="modules.json names the module type 'evil_module.Encoder'"):
        require_known_architecture(folder, "model")


# ---------------------------------------------------------------- embed: lock, checks before writes, per-run rejects


def hold_lock(out: Path) -> subprocess.Popen:
    """A real second process holding out_dir's writer lock (as a running `recforge embed` would)."""
    code = ("import sys, time\nfrom recforge.runstate import output_lock\n"
            "with output_lock(sys.argv[1], 'embed'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", ["embed", "eval retrieval"])
def test_a_second_run_on_a_locked_out_dir_exits_2_naming_the_holder(tmp_path, command):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        if command == "embed":
            args = embed_cmd(out, small_catalogue(tmp_path / "c.jsonl", 4), "minilm")
        else:
            args = [*RECFORGE, "eval", "retrieval", str(REPO / "align/recipes/eval_esci.yaml"), f"out_dir={out}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is being written by another run: pid {holder.pid}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".recforge.lock"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".recforge.lock"}


def test_embed_refused_resume_leaves_the_previous_run_untouched_and_rejects_are_per_run(tmp_path, minilm_dir):
    from recforge.align.align_config import CatalogueSource, EmbedConfig
    from recforge.align.embed import read_vectors, run_embed

    catalogue = small_catalogue(tmp_path / "books.jsonl", 10, bad=True)
    cfg = EmbedConfig(model=str(minilm_dir), out_dir=str(tmp_path / "out"), shard_size=4, faiss_index=False,
                      catalogue=CatalogueSource(path=str(catalogue)))
    run_embed(cfg)
    out = tmp_path / "out"
    run_embed(cfg)  # a rerun of a finished run: its own rejects, not appended to the first run's
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 1
    # killed part-way: the last shard missing, the manifest still "running"
    (out / "shards" / "part-00002.parquet").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    before = snapshot(out)

    with pytest.raises(RecforgeError, match=r"different plan \(shard_size, shards\)"):
        run_embed(cfg.model_copy(update={"shard_size": 5}))
    assert snapshot(out) == before  # resolved_config.yaml, manifest.json, plan.json, rejects.jsonl, shards
    small_catalogue(catalogue, 10, offset=10)  # the input replaced at the same path between the kill and the resume
    with pytest.raises(RecforgeError, match=f"{catalogue}: the catalogue's content changed .*--overwrite"):
        run_embed(cfg)
    assert snapshot(out) == before

    result = run_embed(cfg, overwrite=True)  # start over on the new content
    assert result["resumed_shards"] == 0
    ids, _ = read_vectors(out)
    assert sorted(ids) == sorted(json.loads(line)["book_id"].__str__() for line in catalogue.read_text().splitlines())
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "rejects.jsonl").read_text() == ""  # the new catalogue has no bad row: the old reject is gone
