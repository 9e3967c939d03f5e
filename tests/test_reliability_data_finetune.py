"""Issue 23 on the data and finetune side: one writer per output folder, nothing unfinished read as finished,
publishing never mixes two runs, bounded numbers, held-out rows only in held-out perplexity, a full disk is
one line. Kills are real SIGKILLs of real `recforge` processes; the concurrent runs are two real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recforge.cli import main
from recforge.config import RecforgeError, load_recipe
from recforge.manifest import RunRecorder
from recforge.runstate import producer_of, require_complete

REPO = Path(__file__).resolve().parents[1]
ESCI = REPO / "data_recipes/recipes/esci_search.yaml"
RECIPES = REPO / "finetune/recipes"
SHARD1 = "shard-00001-of-00002"

HOLD = textwrap.dedent(
    """
    import sys, time
    from recforge.runstate import output_lock
    with output_lock(sys.argv[1], "holder"):
        print("held", flush=True)
        time.sleep(60)
    """
)

# Runs `recforge` in this process after wrapping one function so that its N-th call SIGKILLs the process:
# a kill at a chosen point of a real run (the wrapped function is the project's own, not a library's).
KILL_AT = textwrap.dedent(
    """
    import functools, importlib, os, signal, sys
    module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mod = importlib.import_module(module)
    real, calls = getattr(mod, name), []

    @functools.wraps(real)
    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(mod, name, killing)
    from recforge.cli import main
    sys.exit(main(sys.argv[4:]))
    """
)


def recforge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recforge", *args], capture_output=True, text=True, timeout=timeout)


def killed_run(module: str, name: str, nth: int, *args: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILL_AT, module, name, str(nth), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]


def one_line_error(err: str) -> str:
    """The one error line of a refused run (notes, e.g. a stale lock taken over, may precede it)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("recforge: note:")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("recforge: error:"), err[-2000:]
    return lines[0]


def status(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["status"]


# ---------------------------------------------------------------------------- one writer per folder


@pytest.fixture
def held(tmp_path):
    """A second real process holding the writer lock of tmp_path/out until the test ends."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def _command(name: str, out: Path, tmp: Path) -> list[str]:
    if name == "data":
        return ["data", str(ESCI), f"out_dir={out}"]
    if name == "cpt":
        return ["cpt", str(RECIPES / "cpt_esci_tiny.yaml"), f"out_dir={out}"]
    if name == "sft":
        return ["sft", str(RECIPES / "sft_esci_relevance_tiny.yaml"), f"out_dir={out}"]
    return ["publish", str(tmp / "no-such-run"), "--out", str(out)]


@pytest.mark.parametrize("name", ["data", "cpt", "sft", "publish"])
def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder_and_writes_nothing(held, tmp_path, name):
    out, proc = held
    done = recforge(*_command(name, out, tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert f"pid {proc.pid}" in line and "holder" in line
    assert sorted(p.name for p in out.iterdir()) == [".recforge.lock"]  # not a manifest, config or reject written


def test_shard_and_merge_take_the_lock_of_what_they_write(tmp_path):
    out = tmp_path / "run"
    shard = out / SHARD1
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(shard)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        done = recforge("data", str(ESCI), f"out_dir={out}", "--shard", "1/2")
        assert done.returncode == 2 and f"pid {proc.pid}" in one_line_error(done.stderr)
        assert main(["data", str(ESCI), f"out_dir={out}", "--shard", "0/2"]) == 0  # another shard: its own folder
        (shard / "manifest.json").write_text(json.dumps({"command": "data", "status": "complete"}))
        done = recforge("data", str(ESCI), f"out_dir={out}", "--merge")  # a shard being rebuilt is never merged
        assert done.returncode == 2 and f"pid {proc.pid}" in one_line_error(done.stderr)
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- killed data runs


@pytest.fixture(scope="module")
def killed_corpus(tmp_path_factory):
    """A `recforge data` run SIGKILLed after writing its first corpus (items) and before the second."""
    out = tmp_path_factory.mktemp("killed") / "esci"
    killed_run("recforge.data_recipes.build", "write_corpus", 2, "data", str(ESCI), f"out_dir={out}")
    assert sorted((out / "items").glob("*.parquet")) and not (out / "queries").exists()
    return out


def cpt_recipe(path: Path, model: Path, corpus: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "mode": "full", "max_length": 32,
        "data": {"train": {"items": {"path": str(corpus)}}},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 100},
        "out_dir": str(out),
    }))
    return path


def test_cpt_refuses_the_corpus_of_a_killed_data_run(killed_corpus, tiny_model_dir, tmp_path, capsys):
    assert status(killed_corpus) == "running"
    recipe = cpt_recipe(tmp_path / "cpt.yaml", tiny_model_dir, killed_corpus / "items", tmp_path / "cpt")
    assert main(["cpt", str(recipe)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{killed_corpus}/items" in line and "unfinished `recforge data`" in line and "--allow-partial" in line
    assert not (tmp_path / "cpt" / "manifest.json").exists()  # refused before the run wrote anything


def test_allow_partial_reads_it_and_says_so_in_the_manifest(killed_corpus, tiny_model_dir, tmp_path, capsys):
    recipe = cpt_recipe(tmp_path / "cpt.yaml", tiny_model_dir, killed_corpus / "items", tmp_path / "cpt")
    assert main(["cpt", str(recipe), "--allow-partial"]) == 0
    manifest = json.loads((tmp_path / "cpt" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert len(manifest["allow_partial"]) == 1 and "unfinished `recforge data`" in manifest["allow_partial"][0]
    assert "--allow-partial" in capsys.readouterr().err


def test_tokens_from_an_unfinished_data_manifest_are_refused(killed_corpus):
    from recforge.finetune.tokens import tokens_from_manifest

    with pytest.raises(RecforgeError, match="unfinished `recforge data` run"):
        tokens_from_manifest(str(killed_corpus))


def test_sft_refuses_an_unfinished_features_table(tmp_path, capsys):
    gen = tmp_path / "gen"
    RunRecorder(gen, "generate-export", None)  # started, never finished
    pq.write_table(pa.table({"entity_id": ["1"], "tags": [["fantasy"]]}), gen / "features.parquet")
    done = main(["sft", str(RECIPES / "sft_distill_tiny.yaml"), f"distill.features={gen}/features.parquet",
                 f"out_dir={tmp_path / 'sft'}"])
    assert done == 2
    assert "unfinished `recforge generate-export`" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "sft" / "manifest.json").exists()


# ---------------------------------------------------------------------------- shards and merge


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "esci"
    for i in range(2):
        assert main(["data", str(ESCI), f"out_dir={out}", "--shard", f"{i}/2"]) == 0
    return out


def test_a_shard_rebuilt_in_place_and_killed_is_not_merged(sharded, tmp_path, capsys):
    out = tmp_path / "esci"
    shutil.copytree(sharded, out)
    for i in range(2):  # the copies' recorded recipe must name this out_dir
        config = out / f"shard-0000{i}-of-00002" / "resolved_config.yaml"
        config.write_text(config.read_text().replace(str(sharded), str(out)))
    assert main(["data", str(ESCI), f"out_dir={out}", "--merge"]) == 0
    killed_run("recforge.data_recipes.build", "write_corpus", 1, "data", str(ESCI), f"out_dir={out}", "--shard", "1/2")
    assert status(out / SHARD1) == "running"  # the old shard's complete manifest did not survive the rebuild
    assert main(["data", str(ESCI), f"out_dir={out}", "--merge"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert SHARD1 in line and "not finished" in line and "--shard 1/2" in line


@pytest.mark.parametrize("manifest", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"command": "data", "status": "complete"}),
    json.dumps({"command": "data", "status": "complete", "shard": {"index": 1, "count": 2}, "corpora": [],
                "splits": {"leakage": {}}, "special_tokens": [], "rejects": {}}),
    json.dumps({"command": "data", "status": "complete", "shard": {"index": 1, "count": 2},
                "corpora": {"items": {"files": {"train": ["../../../../etc/hostname"]}}},
                "splits": {"leakage": {}}, "special_tokens": [], "rejects": {}}),
    json.dumps({"command": "data", "status": "complete", "shard": {"index": 0, "count": 2}, "corpora": {},
                "splits": {"leakage": {}}, "special_tokens": [], "rejects": {}}),
], ids=["invalid_json", "a_list", "no_corpora", "corpora_a_list", "file_outside_the_shard", "another_shards"])
def test_merge_of_a_shard_manifest_of_the_wrong_shape_is_one_line(sharded, manifest, capsys):
    path = sharded / SHARD1 / "manifest.json"
    good = path.read_text()
    try:
        path.write_text(manifest)
        assert main(["data", str(ESCI), f"out_dir={sharded}", "--merge"]) == 2
        assert SHARD1 in one_line_error(capsys.readouterr().err)
    finally:
        path.write_text(good)


# ---------------------------------------------------------------------------- publish


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from recforge.finetune.demo import esci_rows, write_corpus

    d = tmp_path_factory.mktemp("publish")
    corpus = write_corpus(esci_rows()[:16], d / "esci.parquet")
    (d / "r.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "mode": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"esci": {"path": str(corpus), "split": None}}}, "max_length": 32,
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 100}, "out_dir": str(d / "run"),
    }))
    assert main(["cpt", str(d / "r.yaml")]) == 0
    return d / "run"


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".recforge.lock"}


def test_a_republish_killed_mid_copy_leaves_the_previous_publish_whole(lora_run, tmp_path):
    out = tmp_path / "pub"
    assert main(["publish", str(lora_run), "--out", str(out), "--vllm-check", "off"]) == 0
    before = _contents(out)
    assert json.loads(before["manifest.json"])["status"] == "complete"
    killed_run("shutil", "copy2", 2, "publish", str(lora_run), "--out", str(out), "--vllm-check", "off")
    assert _contents(out) == before  # neither a truncated file nor a running manifest in the published folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pub.tmp-")]  # the kill's staging folder
    assert main(["publish", str(lora_run), "--out", str(out), "--vllm-check", "off"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub"]  # stale staging cleaned, nothing beside
    assert status(out) == "complete" and producer_of(out / "merged")[0] == out.resolve()
    assert require_complete(out / "merged", "model") is None


def test_publish_refuses_an_unfinished_run_and_a_folder_it_would_wipe(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    RunRecorder(run, "cpt", None)  # a rerun that started and was killed: the manifest says running
    assert main(["publish", str(run), "--out", str(tmp_path / "pub")]) == 2
    assert "unfinished `recforge cpt`" in one_line_error(capsys.readouterr().err)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["publish", str(lora_run), "--out", str(mine)]) == 2
    assert "not a recforge publish" in one_line_error(capsys.readouterr().err)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert main(["publish", str(lora_run), "--out", str(lora_run.parent)]) == 2
    assert "holds) the run being published" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------- bounds and held-out rows


@pytest.mark.parametrize("override", ["serializer.max_tokens.title=-5", "serializer.max_chars.title=0",
                                      "mix.weights.items=-1", "mix.weights.items=.nan", "seed=-3",
                                      "pairs.item_item.min_score=-1", "in_context.min_docs=100"])
def test_a_bad_number_in_a_data_recipe_is_one_line_exit_2(override, tmp_path, capsys):
    assert main(["data", str(ESCI), f"out_dir={tmp_path / 'o'}", override]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert override.split("=")[0].rsplit(".", 1)[0] in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("recipe,override", [
    ("cpt_esci_tiny.yaml", "training.learning_rate=-1"), ("cpt_esci_tiny.yaml", "training.per_device_train_batch_size=0"),
    ("cpt_esci_tiny.yaml", "training.save_steps=0"), ("cpt_esci_tiny.yaml", "data.eval.esci.max_rows=0"),
    ("cpt_esci_tiny.yaml", "lora.r=0"), ("cpt_esci_tiny.yaml", "training.num_train_epochs=.inf"),
    ("sft_esci_relevance_tiny.yaml", "max_new_tokens=0"), ("sft_esci_relevance_tiny.yaml", "training.warmup_steps=-2"),
    # warmup_steps is a step count (integer >= 1) or a ratio in [0, 1): 2.5 is neither
    ("cpt_esci_tiny.yaml", "training.warmup_steps=2.5"),
    ("sft_goodbooks_tags_tiny.yaml", "tags.n_tags=0"),
])
def test_a_bad_number_in_a_finetune_recipe_is_one_line_exit_2(recipe, override, tmp_path, capsys):
    command = "cpt" if recipe.startswith("cpt") else "sft"
    assert main([command, str(RECIPES / recipe), f"out_dir={tmp_path / 'o'}", override]) == 2
    assert f"key '{override.split('=')[0]}'" in one_line_error(capsys.readouterr().err)


def test_eval_sources_default_to_held_out_rows_and_refuse_split_less_ones(tmp_path):
    from recforge.finetune.corpus import read_corpus
    from recforge.finetune.cpt_config import CPTConfig

    cfg = load_recipe(CPTConfig, None, ["model.path=m", "data.train.a.path=x", "data.eval.a.path=x"])
    assert cfg.data.eval["a"].split == "eval"
    rows = {"row_id": ["r1", "r2"], "source": ["s", "s"], "documents": [["a"], ["b"]]}
    pq.write_table(pa.table(rows), tmp_path / "nosplit.parquet")
    with pytest.raises(RecforgeError, match=r"corpus .*nosplit.parquet: .*no split column"):
        read_corpus(str(tmp_path / "nosplit.parquet"), "eval")
    pq.write_table(pa.table({**rows, "split": ["eval", None]}), tmp_path / "holes.parquet")
    with pytest.raises(RecforgeError, match=r"corpus .*holes.parquet: row 'r2' .*no split value"):
        read_corpus(str(tmp_path / "holes.parquet"), "eval")
    assert len(read_corpus(str(tmp_path / "nosplit.parquet"), None)) == 2  # split: null reads every row


# ---------------------------------------------------------------------------- rerun bookkeeping, full disk


def test_rejects_are_per_run_and_counted_in_the_manifest(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"product_id": "1", "product_title": "socks"}\nnot json\n{"product_id": "2", "product_title": "hat"}\n')
    args = ["data", str(ESCI), f"out_dir={tmp_path / 'o'}", f"inputs.items.path={items}"]
    counts = []
    for _ in range(2):
        assert main(args) == 0
        manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
        lines = (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()
        assert len(lines) == manifest["rejects"]["total"] and any('"invalid_json"' in line for line in lines)
        counts.append(len(lines))
    assert counts[0] == counts[1]  # the rerun's file holds its own rejects, not both runs'


def test_a_full_disk_in_data_is_one_line_exit_1_naming_the_path(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=48k tmpfs {disk} && exec {sys.executable} -m recforge data {ESCI} "
              f"out_dir={disk}/esci")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user+mount namespaces here to make a small real file system")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert "no space left on device" in line and f"{disk}/esci" in line
