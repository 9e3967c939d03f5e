"""Every command, fed bad input, fails the way the README promises: exit status 2, one line on stderr naming
the file, line or key, no traceback.

Four cases per command: a missing file, an empty file, a file of malformed rows, a wrong-typed key. The
commands run in-process through `recforge.cli.main` (no model is trained or even loaded before the error,
except cpt, which loads the tiny model first).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.cli import main
from recforge.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
CASES = ("missing", "empty", "malformed", "wrong_type")
GARBAGE = b'this is not a row\n{"half": \n\xff\xfe\n'


def recipe(path: str) -> str:
    return str(REPO / path)


def bad_file(tmp: Path, case: str, name: str) -> Path:
    """missing: never written; empty: 0 bytes; malformed: every row unreadable."""
    path = tmp / f"{case}_{name}"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "malformed":
        path.write_bytes(GARBAGE)
    return path


def run_dir(tmp: Path, case: str) -> Path:
    """A cpt/sft run folder for `publish`: missing, empty files, malformed manifest, wrong-typed config key."""
    d = tmp / f"{case}_run"
    if case == "missing":
        return d
    (d / "model").mkdir(parents=True)
    manifest, config = {"empty": ("", ""), "malformed": ("{not json", "model: {path: x}\n"),
                        "wrong_type": ('{"command": "cpt"}', "model: 3\n")}[case]
    (d / "manifest.json").write_text(manifest)
    (d / "resolved_config.yaml").write_text(config)
    return d


def generate_run(tmp: Path, case: str) -> Path:
    """A generate output folder for `generate-export` / `eval tags`: missing, empty shard, garbage shard."""
    d = tmp / f"{case}_gen"
    if case in ("empty", "malformed"):
        (d / "shards").mkdir(parents=True)
        (d / "shards" / "part-00000.parquet").write_bytes(b"" if case == "empty" else GARBAGE)
    return d


def features_file(tmp: Path, tags_type: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / f"features_{tags_type}.parquet"
    tags = [["fiction"]] if tags_type == "list" else ["fiction"]
    pq.write_table(pa.table({"entity_type": ["item"], "entity_id": ["4"], "tags": tags}), path)
    return path


def argv(command: str, case: str, tmp: Path, tiny: Path) -> tuple[list[str], str]:
    """The command line for one case and the text its error line must contain (file, or key)."""
    out = f"out_dir={tmp / 'out'}"
    wrong = case == "wrong_type"

    def with_file(base: list[str], key: str, name: str, wrong_key: str) -> tuple[list[str], str]:
        if wrong:
            return base + [f"{wrong_key}=lots"], wrong_key
        path = bad_file(tmp, case, name)
        return base + [f"{key}={path}"], path.name

    if command == "data":
        return with_file(["data", recipe("data_recipes/recipes/esci_search.yaml"), out], "inputs.items.path",
                         "items.jsonl", "split.eval_percent.query")
    if command == "cpt":
        return with_file(["cpt", recipe("finetune/recipes/cpt_esci_tiny.yaml"), out, f"model.path={tiny}"],
                         "data.train.esci.path", "corpus.parquet", "training.max_steps")
    if command == "sft":
        return with_file(["sft", recipe("finetune/recipes/sft_esci_relevance_tiny.yaml"), out, "model.path=unused"],
                         "relevance.queries", "queries.jsonl", "max_new_tokens")
    if command == "generate":
        return with_file(["generate", "--no-progress", recipe("generate/recipes/goodbooks_tags.yaml"), out,
                          f"model.name_or_path={tiny}"], "input.path", "books.jsonl", "chunk_size")
    if command == "embed":
        return with_file(["embed", recipe("align/recipes/embed_goodbooks.yaml"), out, "model=minilm"],
                         "catalogue.path", "catalogue.jsonl", "batch_size")
    if command == "align":
        return with_file(["align", recipe("align/recipes/esci_minilm.yaml"), out], "data.esci.queries",
                         "queries.jsonl", "train.per_device_train_batch_size")
    if command == "eval retrieval":
        return with_file(["eval", "retrieval", recipe("align/recipes/eval_esci.yaml"), out], "data.esci.queries",
                         "queries.jsonl", "eval.batch_size")
    if command == "eval ctr":
        return with_file(["eval", "ctr", recipe("align/recipes/ctr_goodbooks.yaml"), out], "inputs.interactions.path",
                         "ratings.jsonl", "train.per_device_train_batch_size")
    if command == "export-features":
        return with_file(["export-features", recipe("align/recipes/features_goodbooks_items.yaml"), out],
                         "source.path", "books.jsonl", "embedding.batch_size")
    if command == "publish":
        d = run_dir(tmp, case)
        needle = {"missing": d.name, "empty": "manifest.json", "malformed": "manifest.json", "wrong_type": "model"}[case]
        return ["publish", str(d), "--out", str(tmp / "published")], needle
    if command == "generate-export":
        features_out = ["--out", str(tmp / "features.parquet")]
        if wrong:  # a taxonomy map that is a list, not a mapping
            (tmp / "map.yaml").write_text("- fantasy\n- fiction\n")
            return ["generate-export", str(generate_run(tmp, "empty")), "--taxonomy-map", str(tmp / "map.yaml")] + features_out, "map.yaml"
        d = generate_run(tmp, case)
        return ["generate-export", str(d)] + features_out, d.name if case == "missing" else "part-00000.parquet"
    if command == "eval tags":
        if wrong:  # `tags` holds a string where a list of tags belongs
            return ["eval", "tags", "--pred", str(features_file(tmp, "string"))], "tags"
        if case == "missing":
            return ["eval", "tags", "--pred", str(tmp / "missing.parquet")], "missing.parquet"
        truth = bad_file(tmp, case, "truth.jsonl")  # a valid prediction file, a bad truth file
        return ["eval", "tags", "--pred", str(features_file(tmp, "list")), "--truth", str(truth)], truth.name
    raise AssertionError(command)


COMMANDS = ["data", "cpt", "sft", "publish", "generate", "generate-export", "embed", "align", "eval retrieval",
            "eval tags", "eval ctr", "export-features"]


@pytest.mark.parametrize("command,case", [(c, k) for c in COMMANDS for k in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(command, case, tmp_path, tiny_model_dir, capsys):
    args, needle = argv(command, case, tmp_path, tiny_model_dir)
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("recforge: error: "), err
    assert needle in lines[0], (needle, lines[0])


def test_a_data_row_cannot_set_template_variables():
    """A record holding fields named like the prompt's variables (`k`, `taxonomy`) does not change them."""
    from recforge.prompts import load_prompt

    t = load_prompt("interest_tags")
    variables = {"k": 3, "taxonomy": ["fantasy", "fiction"]}
    clean = t.render_user({"entity_type": "item", "title": "Dune"}, "b1", variables)
    hostile = t.render_user({"entity_type": "item", "title": "Dune", "k": 99, "taxonomy": ["EVIL"], "show_taxonomy": False},
                            "b1", variables)
    assert hostile == clean
    assert "3" in clean and "99" not in hostile and "EVIL" not in hostile and "fantasy" in hostile
    # the spec defaults win over the record too, when the recipe sets nothing
    assert t.render_user({"entity_type": "item", "title": "Dune", "k": 99}, "b1") == t.render_user(
        {"entity_type": "item", "title": "Dune"}, "b1")
    # and the output schema, built from the variables only, never from a record
    assert t.output_for(variables).json_schema["properties"]["tags"]["maxItems"] == 3


CONFIGS = {  # command -> (module, config class) of the recipe-driven commands
    ("data",): ("recforge.data_recipes.recipe_config", "DataRecipe"), ("cpt",): ("recforge.finetune.cpt_config", "CPTConfig"),
    ("sft",): ("recforge.finetune.sft_config", "SFTConfig"),
    ("generate",): ("recforge.generate.generate_config", "GenerateConfig"),
    ("align",): ("recforge.align.align_config", "AlignConfig"), ("embed",): ("recforge.align.align_config", "EmbedConfig"),
    ("eval", "retrieval"): ("recforge.align.align_config", "RetrievalEvalConfig"),
}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command line, argv after `recforge`) of every recipe-driven command in README.md's code blocks."""
    import re
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not re.match(r"^(\.venv/bin/)?recforge \w", line):
                continue
            found.append((line, shlex.split(line)[1:]))
    return found


def test_every_readme_command_overrides_keys_its_recipe_has():
    """The README's commands, validated (not run): each `key=value` must be a key of the recipe's config."""
    import importlib

    from recforge.config import RecforgeError

    commands = readme_commands()
    assert len(commands) > 5
    problems = []
    for line, args in commands:
        n = 2 if args[0] == "eval" else 1
        spec = CONFIGS.get(tuple(args[:n]))
        if spec is None or len(args) <= n or not args[n].endswith(".yaml"):
            continue
        model = getattr(importlib.import_module(spec[0]), spec[1])
        overrides = [a for a in args[n + 1:] if "=" in a and not a.startswith("-")]
        try:
            load_recipe(model, REPO / args[n], overrides)
        except RecforgeError as err:
            if "unknown key" in str(err):
                problems.append(f"{line}: {err}")
    assert not problems, "\n".join(problems)


def test_the_corrected_readme_example_runs_and_the_old_key_is_refused(tmp_path, capsys):
    """The README's first usage example with the recipe's real key (`inputs.items.path`) builds; the key the
    README names (`inputs.products.path`) is refused with one line naming it."""
    sample = str(REPO / "data_recipes/samples/esci_us_titles/products.jsonl.gz")
    assert main(["data", recipe("data_recipes/recipes/esci_search.yaml"), f"out_dir={tmp_path}",
                 f"inputs.items.path={sample}"]) == 0
    capsys.readouterr()
    assert main(["data", recipe("data_recipes/recipes/esci_search.yaml"), f"out_dir={tmp_path}",
                 f"inputs.products.path={sample}"]) == 2
    err = capsys.readouterr().err
    assert "inputs.products" in err and len(err.strip().splitlines()) == 1


# Training settings take Hugging Face TrainingArguments' names (issue 26): a key under its old name is refused in
# one line naming the new one, on the command line or in a recipe file, never ignored or a bare "unknown key".
RENAMED = [
    ("cpt", "finetune/recipes/cpt_esci_tiny.yaml", "training", "epochs", "num_train_epochs", "1"),
    ("cpt", "finetune/recipes/cpt_esci_tiny.yaml", "training", "lr_scheduler", "lr_scheduler_type", "linear"),
    ("sft", "finetune/recipes/sft_esci_relevance_tiny.yaml", "training", "per_device_batch_size",
     "per_device_train_batch_size", "4"),
    ("align", "align/recipes/esci_minilm.yaml", "train", "epochs", "num_train_epochs", "1"),
    ("align", "align/recipes/esci_minilm.yaml", "train", "batch_size", "per_device_train_batch_size", "16"),
    ("align", "align/recipes/esci_minilm.yaml", "train", "warmup_ratio", "warmup_steps", "0.1"),
]


@pytest.mark.parametrize("in_file", [False, True], ids=["override", "recipe_file"])
@pytest.mark.parametrize("command,path,section,old,new,value", RENAMED, ids=[f"{r[0]}-{r[3]}" for r in RENAMED])
def test_a_renamed_training_key_is_one_line_naming_the_new_key(command, path, section, old, new, value, in_file,
                                                               tmp_path, capsys):
    import yaml

    args = [command, recipe(path), f"out_dir={tmp_path / 'out'}"]
    if in_file:  # a recipe written before the rename: the old key in its section, beside the new ones
        data = yaml.safe_load((REPO / path).read_text())
        data[section].pop(new, None)
        data[section][old] = yaml.safe_load(value)
        (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
        args[1] = str(tmp_path / "old.yaml")
    else:
        args.append(f"{section}.{old}={value}")
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].endswith(f": {section}.{old} was renamed {section}.{new}"), lines[0]


# ---------------------------------------------------------------- hostile input (issue 23)
# Broken files and hostile model folders: before, each was a traceback from gzip, pyarrow or transformers, or
# (a pickle-only encoder) loaded and exited 0. Now every one is the same one line, exit 2.

HOSTILE = [("data", "truncated_gz"), ("data", "not_parquet"), ("embed", "truncated_gz"), ("embed", "not_parquet"),
           ("embed", "pickle_only_model"), ("embed", "remote_code_model"),
           ("eval retrieval", "pickle_only_model"), ("eval retrieval", "remote_code_model"),
           ("generate", "pickle_only_model"), ("generate", "remote_code_model")]


def truncated_gz(tmp: Path, sample: str, name: str) -> Path:
    """The first half of a shipped `.jsonl.gz`: a download or copy cut short (gzip's end-of-stream is missing)."""
    data = (REPO / sample).read_bytes()
    path = tmp / name
    path.write_bytes(data[: len(data) // 2])
    return path


def not_parquet(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_bytes(b'{"product_id": "B1", "product_title": "a JSON line, named .parquet"}\n')
    return path


def hostile_model(tmp: Path, case: str) -> Path:
    """A model folder refused before any of it is loaded: pickled weights only, or code asked to run from it."""
    import json

    folder = tmp / case
    folder.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"]}
    if case == "remote_code_model":
        config = {"model_type": "evilnet", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                                        "AutoModel": "modeling_evil.EvilModel"}}
        (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
    else:
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hostile_argv(command: str, case: str, tmp: Path) -> tuple[list[str], str]:
    out = f"out_dir={tmp / 'out'}"
    if case in ("pickle_only_model", "remote_code_model"):
        model = hostile_model(tmp, case)
        if command == "embed":
            return ["embed", recipe("align/recipes/embed_goodbooks.yaml"), out, f"model={model}"], str(model)
        if command == "generate":
            return ["generate", "--no-progress", recipe("generate/recipes/goodbooks_tags.yaml"), out,
                    f"model.name_or_path={model}"], str(model)
        return ["eval", "retrieval", recipe("align/recipes/eval_esci.yaml"), out, f"models.tuned={model}"], str(model)
    if command == "data":
        path = (truncated_gz(tmp, "data_recipes/samples/esci_us_titles/products.jsonl.gz", "products.jsonl.gz")
                if case == "truncated_gz" else not_parquet(tmp, "products.parquet"))
        return ["data", recipe("data_recipes/recipes/esci_search.yaml"), out, f"inputs.items.path={path}"], str(path)
    path = (truncated_gz(tmp, "data_recipes/samples/goodbooks_10k_catalog/books.jsonl.gz", "books.jsonl.gz")
            if case == "truncated_gz" else not_parquet(tmp, "books.parquet"))
    return ["embed", recipe("align/recipes/embed_goodbooks.yaml"), out, "model=minilm", f"catalogue.path={path}"], str(path)


@pytest.mark.parametrize("command,case", HOSTILE)
def test_hostile_file_or_model_is_one_line_exit_2_no_traceback(command, case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))  # the digest cache stays out of the home folder
    args, needle = hostile_argv(command, case, tmp_path)
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("recforge: error: "), err
    assert needle in lines[0], (needle, lines[0])
    if "model" in case:
        assert "pickle" in lines[0] or "trust_remote_code is off" in lines[0], lines[0]
        assert not (tmp_path / "out" / "manifest.json").exists()  # refused before the run wrote anything


def yaml_bomb(levels: int = 9, width: int = 10) -> str:
    """A flow list of 9 anchored lists, each holding the previous one `width` times: ~400 bytes of YAML that
    expand to 1.1e9 strings for anything that walks them (validation, an error message's repr, a template)."""
    parts = ["&l0 [" + ", ".join(["x"] * width) + "]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def bomb_argv(case: str, tmp: Path) -> tuple[list[str], str]:
    """The command line feeding the bomb through one YAML input, and the text the error line must contain."""
    out = f"out_dir={tmp / 'out'}"
    gen = recipe("generate/recipes/goodbooks_tags.yaml")
    if case == "recipe_prompt_vars":
        path = tmp / "tags_bomb.yaml"
        path.write_text((REPO / "generate/recipes/goodbooks_tags.yaml").read_text() + f"\nprompt_vars: {{k: 5, taxonomy: {yaml_bomb()}}}\n")
        return ["generate", "--no-progress", str(path), out], path.name
    if case == "recipe_list_of_strings":
        path = tmp / "esci_bomb.yaml"
        path.write_text((REPO / "data_recipes/recipes/esci_search.yaml").read_text()
                        + f"\nserializer: {{style: pieces, fields: {yaml_bomb()}}}\n")
        return ["data", str(path), out], path.name
    if case == "override":
        return ["generate", "--no-progress", gen, out, f"prompt_vars.taxonomy={yaml_bomb()}"], "prompt_vars.taxonomy"
    if case == "prompt_spec":
        for suffix in (".j2", ".yaml"):
            text = (REPO / "prompts" / f"shelf_tags{suffix}").read_text()
            (tmp / f"bomb_task{suffix}").write_text(text + (f"\nvariables: {{k: 5, taxonomy: {yaml_bomb()}}}\n" if suffix == ".yaml" else ""))
        return ["generate", "--no-progress", gen, out, f"task={tmp / 'bomb_task.j2'}"], "bomb_task.yaml"
    assert case == "taxonomy_map"
    (tmp / "map.yaml").write_text(f"fantasy: {yaml_bomb()}\n")
    run = generate_run(tmp, "empty")
    return ["generate-export", str(run), "--taxonomy-map", str(tmp / "map.yaml"), "--out", str(tmp / "f.parquet")], "map.yaml"


BOMB_CASES = ["recipe_prompt_vars", "recipe_list_of_strings", "override", "prompt_spec", "taxonomy_map"]


@pytest.mark.parametrize("case", BOMB_CASES)
def test_yaml_alias_bomb_fails_fast_in_one_line_with_little_memory(case, tmp_path):
    """Run in a child process, so its peak memory is its own: before, PyYAML's shared aliases were expanded by
    validation or by the error message's repr (past 2 GB, minutes); now the YAML is bounded before that."""
    import os
    import subprocess
    import sys
    import time

    args, needle = bomb_argv(case, tmp_path)
    rss_file = tmp_path / "maxrss"
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so the child would report
    # the pytest process's own peak (about 2 GB late in a full run)
    wrapper = ("import re, sys\nfrom recforge.cli import main\ntry:\n    rc = main(sys.argv[2:])\nfinally:\n"
               "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
               "    open(sys.argv[1], 'w').write(hwm)\nsys.exit(rc)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper, str(rss_file), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RECFORGE_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("recforge: error: ") and needle in lines[0], proc.stderr[-2000:]
    assert "anchors and aliases" in lines[0] and len(lines[0]) < 600, lines[0]
    assert int(rss_file.read_text()) < 1_000_000, "peak memory (KiB) stays that of an ordinary run"
    assert elapsed < 60, elapsed
