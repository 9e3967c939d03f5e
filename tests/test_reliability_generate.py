"""Issue 23 for `recforge generate`, `generate-export`, `eval tags` and the prompt templates: one writer per
output folder, nothing unfinished read as finished, resume checks on input content, per-run bookkeeping, the
split entity named per recipe, hostile templates as per-row errors, a full disk as one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recforge.cli import main
from recforge.config import RecforgeError, load_recipe
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.runner import read_generations

# Holds the writer lock of a folder until killed: the "other run" of the concurrency tests, a real process.
HOLD_LOCK = ("import sys, time\nfrom recforge.runstate import output_lock\n"
             "with output_lock(sys.argv[1], 'generate'):\n    print('held', flush=True)\n    time.sleep(300)\n")


@pytest.fixture(scope="module", autouse=True)
def digest_cache(tmp_path_factory):
    """Keep the sha256 cache (recforge.fingerprint) out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def write_items(path: Path, ids, bad_lines: int = 0, prefix: str = "The book") -> Path:
    rows = [json.dumps({"book_id": i, "title": f"{prefix} {i}", "authors": ["A. Writer"]}) for i in ids]
    path.write_text("".join(line + "\n" for line in rows + ["{not json"] * bad_lines))
    return path


def recipe(tmp: Path, model: Path, items: Path, name: str = "recipe.yaml", **over) -> Path:
    data = {
        "task": "interest_tags",
        "prompt_vars": {"k": 3, "show_taxonomy": False},
        "input": {"path": str(items), "id": "book_id", "fields": {"title": "title", "authors": "authors"},
                  "constants": {"entity_type": "item"}},
        "model": {"name_or_path": str(model)},
        "engine": {"kind": "transformers", "batch_size": 8, "max_model_len": 256, "cpu_threads": 1},
        "sampling": {"max_tokens": 3},  # bookkeeping tests: most rows fail (truncated), which is fine here
        "max_retries": 0,
        "chunk_size": 2,
        "max_failure_rate": 1.0,
        "out_dir": str(tmp / "out"),
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("recforge: error: "), err
    return lines[0]


def failed_lines(out: Path) -> list[dict]:
    path = out / "failed.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def ids_written(out: Path) -> list[str]:
    return sorted([r["id"] for r in read_generations(out).to_pylist()] + [f["id"] for f in failed_lines(out)])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished generate run of 6 items (3 chunks)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(["generate", str(recipe(tmp, tiny_model_dir, write_items(tmp / "items.jsonl", range(1, 7)))), "--no-progress"]) == 0
    return tmp / "out"


# ------------------------------------------------------------------ one writer per folder


@pytest.mark.parametrize("shard", [None, "0/2"])
def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(shard, tiny_model_dir, tmp_path, capsys):
    """Two real processes: one holds the folder's lock (the shard folder under --shard), the CLI run is refused."""
    out = tmp_path / "out"
    locked = out / "shard-00000-of-00002" if shard else out
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(locked)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        path = recipe(tmp_path, tiny_model_dir, write_items(tmp_path / "items.jsonl", range(1, 5)))
        capsys.readouterr()
        status = main(["generate", str(path), "--no-progress"] + (["--shard", shard] if shard else []))
        line = one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2
    assert f"pid {holder.pid}" in line and str(locked) in line and "generate" in line
    assert not (locked / "manifest.json").exists() and not (locked / "shards").exists()  # it wrote nothing


def test_reconcile_keeps_one_failure_line_per_id(finished, tmp_path):
    """failed.jsonl written twice per id by two concurrent runs (before the lock) is repaired on the next run."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    lines = failed_lines(out)
    assert lines, "the tiny model at 3 tokens fails rows: the test needs some"
    (out / "failed.jsonl").write_text("".join(json.dumps(f) + "\n" for f in lines + lines))
    cfg = load_recipe(GenerateConfig, finished.parent / "recipe.yaml", [f"out_dir={out}"])
    from recforge.generate.runner import run_generate

    manifest = run_generate(cfg, progress=False)
    after = failed_lines(out)
    assert sorted(f["id"] for f in after) == sorted(f["id"] for f in lines)
    assert manifest["failures"]["rows"] == len(lines) and manifest["failures"]["rate"] <= 1.0
    assert ids_written(out) == sorted(str(i) for i in range(1, 7))


# ------------------------------------------------------------------ resume checks and rerun bookkeeping


def test_a_changed_input_file_refuses_the_resume_and_leaves_the_run_as_it_was(tiny_model_dir, tmp_path, capsys):
    items = write_items(tmp_path / "items.jsonl", range(1, 7))
    path = recipe(tmp_path, tiny_model_dir, items)
    out = tmp_path / "out"
    assert main(["generate", str(path), "--no-progress"]) == 0
    (out / "shards" / "part-00002.parquet").unlink()  # as if killed before its last chunk
    kept = {name: (out / name).read_bytes() for name in ("resolved_config.yaml", "manifest.json", "fingerprint.json")}
    before = ids_written(out)
    write_items(items, range(101, 107))  # another file at the same path
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"recforge: error: input.path {items}: the input's content changed since the run in {out} started")
    assert "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing of the previous run replaced
    assert ids_written(out) == before  # no mixed rows
    assert main(["generate", str(path), "--no-progress", "--overwrite"]) == 0
    assert ids_written(out) == sorted(str(i) for i in range(101, 107))


def test_a_refused_fingerprint_leaves_config_and_manifest_byte_identical(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    kept = {name: (out / name).read_bytes() for name in ("resolved_config.yaml", "manifest.json")}
    capsys.readouterr()
    assert main(["generate", str(finished.parent / "recipe.yaml"), f"out_dir={out}", "sampling.max_tokens=5", "--no-progress"]) == 2
    assert "used a different fingerprint (sampling)" in one_line_error(capsys)
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_the_history_items_file_is_a_checked_input(tiny_model_dir, tmp_path):
    from recforge.generate.runner import GenerationRun
    from recforge.shards import ShardSpec

    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"user_id": "u1", "item_ids": [1, 2]}) + "\n")
    cfg = load_recipe(GenerateConfig, recipe(tmp_path, tiny_model_dir, users, **{
        "task": "kar_user_preference", "input.kind": "records", "input.id": "user_id", "input.fields": {},
        "input.constants": {"entity_type": "user"}, "input.history": {"items_path": str(tmp_path / "books.jsonl")}}))
    inputs = GenerationRun(cfg, ShardSpec.parse(None), progress=False).contract()["inputs"]
    assert {k: v["path"] for k, v in inputs.items()} == {"input.path": str(users), "input.history.items_path": str(tmp_path / "books.jsonl")}
    assert inputs["input.path"]["sha256"] and inputs["input.history.items_path"]["sha256"] is None  # not there yet


def test_rejects_are_per_run_and_counted(tiny_model_dir, tmp_path):
    path = recipe(tmp_path, tiny_model_dir, write_items(tmp_path / "items.jsonl", range(1, 5), bad_lines=2))
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["generate", str(path), "--no-progress"]) == 0
        assert len((out / "rejects.jsonl").read_text().splitlines()) == 2
        outputs = {o["name"]: o for o in json.loads((out / "manifest.json").read_text())["outputs"]}
        assert outputs["rejects"]["rows"] == 2


# ------------------------------------------------------------------ consumers refuse unfinished runs


def unfinish(run: Path, how: str) -> None:
    manifest = run / "manifest.json"
    if how == "no manifest":
        manifest.unlink()
    else:
        m = json.loads(manifest.read_text())
        m.update({"status": "running"} if how == "running" else {"complete": False})
        manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["running", "complete false", "no manifest"])
def test_export_and_eval_tags_refuse_an_unfinished_run(how, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    unfinish(run, how)
    features = tmp_path / "features" / "features.parquet"
    capsys.readouterr()
    assert main(["generate-export", str(run), "--out", str(features)]) == 2
    assert str(run) in one_line_error(capsys) and not features.exists()
    assert main(["eval", "tags", "--pred", str(run), "--out", str(tmp_path / "m.json")]) == 2
    assert str(run) in one_line_error(capsys) and not (tmp_path / "m.json").exists()

    assert main(["generate-export", str(run), "--out", str(features), "--allow-partial"]) == 0
    assert str(run) in json.loads((features.parent / "manifest.json").read_text())["partial_inputs"][0]
    assert main(["eval", "tags", "--pred", str(run), "--out", str(tmp_path / "m.json"), "--allow-partial"]) == 0
    assert str(run) in json.loads((tmp_path / "m.json").read_text())["partial_inputs"][0]


def test_a_sharded_run_missing_a_shard_folder_is_unfinished(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run / "shard-00000-of-00002")
    capsys.readouterr()
    assert main(["generate-export", str(run), "--out", str(tmp_path / "f" / "features.parquet")]) == 2
    assert "[1] of 2 are missing" in one_line_error(capsys)
    shutil.copytree(finished, run / "shard-00001-of-00002")
    assert main(["generate-export", str(run), "--out", str(tmp_path / "f" / "features.parquet")]) == 0


def test_export_never_writes_its_manifest_over_another_runs(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    kept = (run / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["generate-export", str(run), "--out", str(run / "features.parquet")]) == 2  # the run folder itself
    assert "run folder read by this export" in one_line_error(capsys)
    other = tmp_path / "data_run"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"command": "data", "status": "complete"}))
    assert main(["generate-export", str(run), "--out", str(other / "features.parquet")]) == 2
    assert "`recforge data`" in one_line_error(capsys)
    assert (run / "manifest.json").read_bytes() == kept and not (run / "features.parquet").exists()
    assert json.loads((other / "manifest.json").read_text())["command"] == "data"
    # its own folder again (a rerun): fine
    for _ in range(2):
        assert main(["generate-export", str(run), "--out", str(run / "features" / "features.parquet")]) == 0


def test_export_holds_the_lock_of_its_folder(finished, tmp_path, capsys):
    folder = tmp_path / "features"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["generate-export", str(finished), "--out", str(folder / "features.parquet")]) == 2
        assert f"pid {holder.pid}" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ model folders


def test_generate_refuses_a_model_from_an_unfinished_run(finished, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "publish_run"
    model = run / "merged"
    model.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (model / f.name).symlink_to(f)
    (run / "manifest.json").write_text(json.dumps({"command": "publish", "status": "running"}))
    path = recipe(tmp_path, model, finished.parent / "items.jsonl")
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "model.name_or_path" in line and "`recforge publish`" in line and "--allow-partial" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert main(["generate", str(path), "--no-progress", "--allow-partial"]) == 0
    assert "publish" in json.loads((tmp_path / "out" / "manifest.json").read_text())["partial_inputs"][0]


def test_generate_refuses_an_input_file_of_an_unfinished_run(tiny_model_dir, tmp_path, capsys):
    data_run = tmp_path / "data_run"
    data_run.mkdir()
    (data_run / "manifest.json").write_text(json.dumps({"command": "data", "status": "running"}))
    path = recipe(tmp_path, tiny_model_dir, write_items(data_run / "items.jsonl", [1, 2]))
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "input.path" in line and "`recforge data`" in line and not (tmp_path / "out").exists()


def test_a_pickle_only_model_folder_is_refused_by_the_one_helper(tiny_model_dir, tmp_path, capsys):
    from recforge.models import require_safetensors

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really weights")
    with pytest.raises(RecforgeError, match=r"x .*pickled.*pytorch_model.bin"):
        require_safetensors(folder, "x")
    require_safetensors(tiny_model_dir, "x")  # safetensors: fine
    path = recipe(tmp_path, folder, write_items(tmp_path / "items.jsonl", [1]))
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "model.name_or_path" in line and "pickle" in line and str(folder) in line
    assert not (tmp_path / "out" / "resolved_config.yaml").exists()


# ------------------------------------------------------------------ hostile templates


HOSTILE = {  # title -> what the template does for it
    "include": '{% include "/etc/passwd" %}',
    "import": '{% import "x.j2" as x %}',
    "extends": "",  # `extends` must come first in a template: its own test below
    "range": "{{ range(10**9) | list | length }}",
    "nested": "{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}",
    "mul": '{{ "x" * 10**10 }}',
    "dunder": "{{ title.__class__.__mro__[1].__subclasses__() }}",
}


def hostile_task(tmp: Path) -> Path:
    branches = "".join(f'{{% if title == "{k}" %}}{v}{{% endif %}}' for k, v in HOSTILE.items() if v)
    (tmp / "hostile.j2").write_text(branches + "Tags for {{ title }}:")
    (tmp / "hostile.yaml").write_text("name: hostile\nversion: '1'\noutput: {format: text}\nsampling: {max_tokens: 2}\n")
    return tmp / "hostile.j2"


def test_hostile_template_rows_are_render_errors_and_the_run_goes_on(tiny_model_dir, tmp_path):
    items = tmp_path / "items.jsonl"
    titles = [k for k, v in HOSTILE.items() if v] + ["fine one", "fine two"]
    items.write_text("".join(json.dumps({"book_id": i, "title": t}) + "\n" for i, t in enumerate(titles)))
    path = recipe(tmp_path, tiny_model_dir, items, task=str(hostile_task(tmp_path)), prompt_vars={},
                  **{"input.fields": {"title": "title"}})
    assert main(["generate", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    failed = {f["id"]: f for f in failed_lines(out)}
    assert {titles[int(i)] for i in failed} == set(titles) - {"fine one", "fine two"}
    assert {f["reason"] for f in failed.values()} == {"render_error"}
    assert {r["id"] for r in read_generations(out).to_pylist()} == {str(titles.index("fine one")), str(titles.index("fine two"))}


def test_a_template_that_does_not_compile_is_one_line_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "broken.j2").write_text("{% for x in %}")
    (tmp_path / "broken.yaml").write_text("name: broken\nversion: '1'\noutput: {format: text}\n")
    path = recipe(tmp_path, tiny_model_dir, write_items(tmp_path / "items.jsonl", [1]), task=str(tmp_path / "broken.j2"))
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 2
    assert "does not compile" in one_line_error(capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ['{% extends "base.j2" %}', '{% include "x" %}', "{{ range(10**9) | list }}"])
def test_prompts_render_of_a_hostile_template_is_one_line(source, tmp_path, capsys):
    (tmp_path / "t.j2").write_text(source)
    (tmp_path / "t.yaml").write_text("name: t\nversion: '1'\noutput: {format: text}\n")
    capsys.readouterr()
    assert main(["prompts", "render", str(tmp_path / "t.j2"), "--record", '{"title": "x"}']) == 2
    assert "template error" in one_line_error(capsys)


def test_a_chat_template_tripping_the_sandbox_is_a_render_error_row(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (model / f.name).symlink_to(f)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if 'evil' in m.content %}{{ m.content.__class__.__mro__ }}{% endif %}"
        "{% if 'huge' in m.content %}{{ range(10**9) | length }}{% endif %}{{ m.content }}\n{% endfor %}")
    items = write_items(tmp_path / "items.jsonl", [1, 2, 3])
    items.write_text(items.read_text().replace("The book 1", "evil").replace("The book 2", "huge"))
    assert main(["generate", str(recipe(tmp_path, model, items)), "--no-progress"]) == 0
    failed = {f["id"]: f for f in failed_lines(tmp_path / "out")}
    assert failed["1"]["reason"] == failed["2"]["reason"] == "render_error"
    assert "chat template" in failed["1"]["detail"] and failed.get("3", {}).get("reason") != "render_error"


# ------------------------------------------------------------------ the split entity


def test_input_split_uses_the_named_entity_of_the_one_split_rule(tiny_model_dir, tmp_path):
    """ESCI-like products (`item`, the default for kind=items) get data_recipes' item split; goodbooks books keep the book split."""
    import polars as pl

    from recforge.data_recipes.splits import SplitConfig, with_hash_split
    from recforge.generate.inputs import read_records
    from recforge.splits import is_eval

    ids = [f"B0{i:07d}" for i in range(200)]
    items = write_items(tmp_path / "items.jsonl", ids)
    cfg = load_recipe(GenerateConfig, recipe(tmp_path, tiny_model_dir, items, **{"input.split": "heldout"}))
    held = [i for i, _ in read_records(cfg, tmp_path / "rejects.jsonl")]
    frame = with_hash_split(pl.DataFrame({"id": ids}), "id", SplitConfig(), "item")
    assert held == frame.filter(pl.col("split") == "eval")["id"].to_list() and 10 < len(held) < 80
    books = load_recipe(GenerateConfig, recipe(tmp_path, tiny_model_dir, items, **{"input.split": "heldout",
                                                                                    "input.split_entity": "book"}))
    assert [i for i, _ in read_records(books, tmp_path / "rejects.jsonl")] == [i for i in ids if is_eval("book", i)] != held
    with pytest.raises(RecforgeError, match="input.split_entity"):  # a user or a query? the recipe must say
        load_recipe(GenerateConfig, recipe(tmp_path, tiny_model_dir, items, **{"input.split": "heldout", "input.kind": "records"}))


def test_the_shipped_goodbooks_tags_recipe_keeps_its_book_split(repo_root, tmp_path):
    from recforge.generate.inputs import read_records
    from recforge.splits import is_eval

    cfg = load_recipe(GenerateConfig, repo_root / "generate/recipes/goodbooks_tags.yaml")
    assert cfg.input.split_entity == "book"
    held = [i for i, _ in read_records(cfg, tmp_path / "rejects.jsonl")]
    assert len(held) == 401 and all(is_eval("book", i) for i in held)


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_generate_on_a_full_disk_is_one_line_exit_1(tiny_disk, tiny_model_dir, tmp_path, capsys):
    out = tiny_disk / "gen"
    path = recipe(tmp_path, tiny_model_dir, write_items(tmp_path / "items.jsonl", range(1, 41)), out_dir=str(out))
    capsys.readouterr()
    assert main(["generate", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "no space left" in lines[0] and str(out) in lines[0]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # never read as finished
