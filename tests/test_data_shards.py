"""`recforge data --shard i/N` + `--merge`: N array-job shards give exactly the unsharded corpora, checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recforge.config import RecforgeError, load_recipe
from recforge.data_recipes.build import run_data
from recforge.data_recipes.shard_merge import merge_shards
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.shards import ShardSpec

REPO = Path(__file__).resolve().parents[1]
ESCI = REPO / "data_recipes/recipes/esci_search.yaml"
GOODBOOKS = REPO / "data_recipes/recipes/goodbooks.yaml"


def recipe(path: Path, out: Path, *overrides: str) -> DataRecipe:
    return load_recipe(DataRecipe, path, [f"out_dir={out}", *overrides])


def corpus_rows(folder: Path) -> dict[str, pl.DataFrame]:
    out = {}
    for corpus in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("shard-")):
        files = sorted(corpus.glob("*.parquet"))
        if files:
            frame = pl.read_parquet(files)
            out[corpus.name] = frame.sort(frame.columns[0])
    return out


def build_sharded(path: Path, out: Path, n: int, *overrides: str) -> dict:
    for i in range(n):
        run_data(recipe(path, out, *overrides), shard=ShardSpec(i, n))
    return merge_shards(recipe(path, out, *overrides))


@pytest.mark.parametrize("path", [ESCI, GOODBOOKS], ids=["esci_search", "goodbooks_user_sequences"])
def test_merged_shards_equal_the_unsharded_corpora(tmp_path, path):
    run_data(recipe(path, tmp_path / "whole"))
    merged = build_sharded(path, tmp_path / "sharded", 3)

    whole, parts = corpus_rows(tmp_path / "whole"), corpus_rows(tmp_path / "sharded")
    assert set(parts) == set(whole) and "in_context" in whole
    if path == GOODBOOKS:
        assert "mix" in whole  # built by the merge from the merged corpora, the same rows as one run's
    for name in whole:
        assert parts[name].equals(whole[name]), name  # same rows, texts, splits and meta
    assert merged["splits"]["leakage_ok"] and not merged["splits"]["per_shard_failures"]
    assert merged["splits"]["cross_shard"], "the doc-id leakage checks are recomputed on the merged rows"
    # each shard built only its own groups: the shards' in-context rows add up, none repeated
    shard_rows = [json.loads((tmp_path / "sharded" / ShardSpec(i, 3).folder / "manifest.json").read_text())
                  ["corpora"]["in_context"]["rows"] for i in range(3)]
    assert sum(r["train"] + r["eval"] for r in shard_rows) == whole["in_context"].height
    assert all(r["train"] > 0 for r in shard_rows)


def test_merge_refuses_missing_foreign_and_misplaced_shards(tmp_path):
    out = tmp_path / "run"
    cfg = recipe(ESCI, out)
    run_data(cfg, shard=ShardSpec(0, 2))
    with pytest.raises(RecforgeError, match="not finished.*shard-00001-of-00002"):
        merge_shards(cfg)

    run_data(recipe(ESCI, out, "seed=7"), shard=ShardSpec(1, 2))
    with pytest.raises(RecforgeError, match="shard-00001-of-00002/resolved_config.yaml: this shard ran a different recipe"):
        merge_shards(cfg)

    run_data(cfg, shard=ShardSpec(1, 2))
    merge_shards(cfg)  # now consistent
    # a row copied into the other shard: refused, naming the shard folder and corpus
    items0 = sorted((out / "shard-00000-of-00002/items").glob("train-*.parquet"))[0]
    items1 = sorted((out / "shard-00001-of-00002/items").glob("train-*.parquet"))[0]
    stray = pl.read_parquet(items0).head(1)
    pl.concat([pl.read_parquet(items1), stray]).write_parquet(items1)
    with pytest.raises(RecforgeError, match=r"shard-00001-of-00002/items: 1 rows whose group key belongs to another shard"):
        merge_shards(cfg)


def test_shard_refuses_what_cannot_be_split_consistently(tmp_path):
    with pytest.raises(RecforgeError, match="split.time_cutoff"):
        run_data(recipe(ESCI, tmp_path / "a", "split.by=time"), shard=ShardSpec(0, 2))


def test_cli_shard_and_merge(tmp_path):
    out = tmp_path / "cli"
    for i in range(2):
        done = subprocess.run([sys.executable, "-m", "recforge", "data", str(ESCI), f"out_dir={out}", "--shard", f"{i}/2"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"shard-0000{i}-of-00002 (shard {i} of 2)" in done.stdout
    done = subprocess.run([sys.executable, "-m", "recforge", "data", str(ESCI), f"out_dir={out}", "--merge"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "merged 2 shards" in done.stdout and "leakage check: ok" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "recforge", "data", str(ESCI), f"out_dir={out}", "--shard", "2/2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--shard '2/2': need 0 <= i < N" in bad.stderr


def test_merge_streams_the_shards_never_reading_a_whole_corpus(tmp_path, monkeypatch):
    """The merge checks ids and keys from a few columns and copies rows a batch at a time (issue 27): no call
    reads every column of a shard's corpus at once, and the merged corpora are still the unsharded ones."""
    import pyarrow.parquet as pq

    from recforge.data_recipes import shard_merge

    out = tmp_path / "sharded"
    for i in range(2):
        run_data(recipe(ESCI, out), shard=ShardSpec(i, 2))
    run_data(recipe(ESCI, tmp_path / "whole"))

    def whole_read(*args, **kwargs):
        raise AssertionError("the merge read a whole corpus")

    real_read, real_table, real_batches = pq.ParquetFile.read, pq.read_table, pq.ParquetFile.iter_batches
    row_columns = {"documents", "text", "anchor", "positive", "negative"}

    def read(self, columns=None, **kwargs):
        assert columns is not None and not row_columns & set(columns), columns
        return real_read(self, columns=columns, **kwargs)

    def read_table(source, columns=None, **kwargs):
        assert columns is not None and not row_columns & set(columns), columns
        return real_table(source, columns=columns, **kwargs)

    batch_sizes = []

    def iter_batches(self, batch_size=65_536, **kwargs):
        batch_sizes.append(batch_size)
        return real_batches(self, batch_size=batch_size, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pl, "read_parquet", whole_read)
        m.setattr(pl, "scan_parquet", whole_read)
        m.setattr(pq, "read_table", read_table)
        m.setattr(pq.ParquetFile, "read", read)
        m.setattr(pq.ParquetFile, "iter_batches", iter_batches)
        merged = merge_shards(recipe(ESCI, out))
    assert batch_sizes and max(batch_sizes) <= shard_merge.MERGE_BATCH_ROWS
    assert merged["splits"]["leakage_ok"]
    whole, parts = corpus_rows(tmp_path / "whole"), corpus_rows(out)
    assert set(parts) == set(whole)
    for name in whole:
        assert parts[name].equals(whole[name]), name
    # row for row in file order too: train rows, then eval rows, shard by shard as the merge always wrote them
    for name, info in merged["corpora"].items():
        for split, files in info["files"].items():
            copied = pl.read_parquet([out / f for f in files])
            shards = [pl.read_parquet(sorted((out / ShardSpec(i, 2).folder / name).glob(f"{split}-*.parquet")))
                      for i in range(2) if sorted((out / ShardSpec(i, 2).folder / name).glob(f"{split}-*.parquet"))]
            assert copied.equals(pl.concat(shards)), (name, split)
