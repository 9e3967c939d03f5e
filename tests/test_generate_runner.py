"""`recforge generate` end to end on the tiny model: outputs, failures with reasons, resume, fingerprints, shards."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from recforge.cli import main
from recforge.config import RecforgeError, load_recipe
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.runner import read_generations, run_generate

TAXONOMY = ["fantasy", "fiction", "classics", "romance", "mystery", "young-adult", "history", "science-fiction"]


def write_items(path: Path, n: int, extra: list[dict] | None = None) -> Path:
    rows = [{"book_id": i, "title": f"The {w} of book {i}", "authors": ["A. Writer"], "original_publication_year": 1900 + i}
            for i, w in zip(range(1, n + 1), ["night", "sea", "garden", "war", "road", "star"] * 100)]
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, model: Path, items: Path, **over) -> Path:
    data = {
        "task": "interest_tags",
        "prompt_vars": {"k": 3, "show_taxonomy": False},
        "input": {"path": str(items), "kind": "items", "id": "book_id",
                  "fields": {"title": "title", "authors": "authors", "year": "original_publication_year"},
                  "constants": {"entity_type": "item"}},
        "taxonomy": {"tags": TAXONOMY},
        "model": {"name_or_path": str(model)},
        "engine": {"kind": "transformers", "batch_size": 8, "max_model_len": 256, "cpu_threads": 1},
        "sampling": {"max_tokens": 24},
        "chunk_size": 4,
        # The tiny model is no tagger (short budgets truncate its JSON): these tests check bookkeeping, so
        # they allow any failure share; test_rows_failing_validation_... checks the default threshold.
        "max_failure_rate": 1.0,
        "out_dir": str(tmp_path / "out"),
    }
    for k, v in over.items():
        node = data
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def failed_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def digest_cache(tmp_path_factory):
    """Keep the sha256 cache of model files (recforge.fingerprint) out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    items = write_items(tmp / "items.jsonl", 10, extra=[
        {"book_id": 900, "title": "word " * 400},  # over the 256-token budget
        {"book_id": 901, "authors": ["nobody"], "original_publication_year": 1},  # no title: the template cannot render
    ])
    rc = main(["generate", str(recipe(tmp, tiny_model_dir, items)), "--no-progress"])
    return tmp, rc


def test_every_input_is_an_output_row_or_a_failure_with_reason(finished_run):
    tmp, rc = finished_run
    out = tmp / "out"
    table = read_generations(out).to_pylist()
    failed = failed_rows(out)
    ids = [r["id"] for r in table] + [f["id"] for f in failed]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 11)] + ["900", "901"]
    assert len(ids) == len(set(ids))
    reasons = {f["id"]: f["reason"] for f in failed}
    assert reasons["900"] == "prompt_too_long"
    assert reasons["901"] == "render_error"
    assert "record '901'" in next(f["detail"] for f in failed if f["id"] == "901")
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": TAXONOMY}, "maxItems": 5}}, "required": ["tags"]}
    for row in table:
        jsonschema.validate(json.loads(row["output"]), schema)
        assert row["task"] == "interest_tags" and row["entity_type"] == "item" and row["completion_tokens"] > 0
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["input_rows"] == 12
    contract = manifest["fingerprint"]  # recforge.run_contract: job, inputs, model, settings
    assert contract["job"] == "generate" and contract["inputs"]["input.path"]["sha256"]
    assert contract["settings"]["template_hash"] and contract["settings"]["engine"] == "transformers"
    assert contract["model"]["digest"]
    for key in ("rows_per_s", "tokens_per_s", "failure_rate", "eta_s"):
        assert key in manifest["progress"]
    assert manifest["rejects"]["by_reason"]["prompt_too_long"] == 1
    assert (out / "resolved_config.yaml").is_file()


def test_rows_failing_validation_are_retried_then_reported(tiny_model_dir, tmp_path, capsys):
    items = write_items(tmp_path / "items.jsonl", 3)
    assert GenerateConfig.model_fields["max_failure_rate"].default == 0.2
    # 2 tokens cannot hold a complete JSON object: every attempt is truncated.
    rc = main(["generate", str(recipe(tmp_path, tiny_model_dir, items)), "sampling.max_tokens=2", "max_retries=2",
               "max_failure_rate=0.2", "--no-progress"])
    failed = failed_rows(tmp_path / "out")
    assert len(failed) == 3
    assert all(f["reason"] == "truncated" and f["attempts"] == 3 for f in failed)
    # Every row failed: a pipeline must not go on as if it had worked.
    assert rc == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recforge generate:")]
    assert err == [f"recforge generate: failure rate 100.0% (3 of 3 rows) is over max_failure_rate=0.2; "
                   f"the failed rows and their reasons are in {tmp_path / 'out' / 'failed.jsonl'}"]


def test_rerun_skips_finished_rows_and_changed_fingerprint_is_refused(finished_run, tiny_model_dir):
    tmp, _ = finished_run
    out = tmp / "out"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    n_failed = len(failed_rows(out))
    cfg = load_recipe(GenerateConfig, tmp / "recipe.yaml", ["engine.batch_size=3"])
    manifest = run_generate(cfg, progress=False)
    assert manifest["progress"]["rows_done"] == 0 and manifest["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    assert len(failed_rows(out)) == n_failed  # not duplicated by the rerun

    changed = load_recipe(GenerateConfig, tmp / "recipe.yaml", ["sampling.max_tokens=20"])
    with pytest.raises(RecforgeError, match=r"used a different fingerprint \(sampling\); .*--force"):
        run_generate(changed, progress=False)
    manifest = run_generate(changed, force=True, progress=False)
    assert manifest["fingerprint_history"][-1]["settings"]["sampling"]["max_tokens"] == 24
    assert manifest["progress"]["rows_done"] == 0  # --force keeps the finished rows

    manifest = run_generate(changed, overwrite=True, progress=False)  # --overwrite starts over
    assert manifest["progress"]["rows_done"] + manifest["progress"]["rows_failed"] == 12
    assert manifest["fingerprint_history"] == [] and manifest["complete"]


def test_retrained_model_with_the_same_file_sizes_is_refused(tiny_model_dir, tmp_path):
    """Retraining a same-architecture model into the same folder keeps every file size: the digest must read content."""
    import shutil
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    # Over 64 MiB, like real weights (an unused tensor the loader skips): where names + sizes used to stand in for content.
    tensors["zz_padding"] = torch.zeros(17 << 20)
    save_file(tensors, weights, metadata={"format": "pt"})
    items = write_items(tmp_path / "items.jsonl", 2)
    cfg = load_recipe(GenerateConfig, recipe(tmp_path, model, items, **{"sampling.max_tokens": 4}))
    first = run_generate(cfg, progress=False)

    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # "retrain": flip the lowest mantissa bit of the first weight
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        f.seek(start)
        byte = f.read(1)[0]
        f.seek(start)
        f.write(bytes([byte ^ 1]))
    assert weights.stat().st_size == size > 64 << 20
    with pytest.raises(RecforgeError, match=r"used a different fingerprint \(model.digest\)"):
        run_generate(cfg, progress=False)
    resumed = run_generate(cfg, force=True, progress=False)  # --force resumes, and records both models
    assert resumed["fingerprint_history"][-1]["model"]["digest"] == first["fingerprint"]["model"]["digest"]
    assert resumed["fingerprint"]["model"]["digest"] != first["fingerprint"]["model"]["digest"]


def test_shards_partition_the_input(tiny_model_dir, tmp_path):
    items = write_items(tmp_path / "items.jsonl", 8)
    path = recipe(tmp_path, tiny_model_dir, items, **{"sampling.max_tokens": 12})
    for i in range(2):
        assert main(["generate", str(path), "--shard", f"{i}/2", "--no-progress"]) == 0
    parts = []
    for i in range(2):
        d = tmp_path / "out" / f"shard-{i:05d}-of-00002"
        rows = read_generations(d).to_pylist() + failed_rows(d)
        parts.append({r["id"] for r in rows})
        assert json.loads((d / "fingerprint.json").read_text())["settings"]["shard"] == f"{i}/2"
    assert not parts[0] & parts[1] and parts[0] | parts[1] == {str(i) for i in range(1, 9)}
    assert parts[0] and parts[1]
    assert len(read_generations(tmp_path / "out")) + sum(len(failed_rows(tmp_path / "out" / f"shard-{i:05d}-of-00002")) for i in range(2)) == 8
    with pytest.raises(SystemExit):
        main(["generate", str(path), "--shard"])
    assert main(["generate", str(path), "--shard", "2/2"]) == 2


def test_missing_model_falls_back_and_says_so(tiny_model_dir, tmp_path, capsys):
    items = write_items(tmp_path / "items.jsonl", 2)
    path = recipe(tmp_path, tiny_model_dir, items, **{"model.name_or_path": "runs/sft/does_not_exist", "model.fallback": str(tiny_model_dir), "sampling.max_tokens": 12})
    assert main(["generate", str(path), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_used"]["name_or_path"] == str(tiny_model_dir)
    assert "does not exist; using model.fallback" in manifest["model_used"]["note"]
    assert "does not exist; using model.fallback" in capsys.readouterr().err


def test_bad_recipe_key_and_missing_input_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    items = write_items(tmp_path / "items.jsonl", 2)
    path = recipe(tmp_path, tiny_model_dir, items)
    assert main(["generate", str(path), "sampling.max_tokenz=3"]) == 2
    assert "key 'sampling.max_tokenz': unknown key" in capsys.readouterr().err
    assert main(["generate", str(path), f"input.path={tmp_path}/nope.jsonl"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_prompts_cli(capsys, tiny_model_dir):
    assert main(["prompts", "list"]) == 0
    listing = capsys.readouterr().out
    assert "interest_tags" in listing and "kar_user_preference" in listing
    assert main(["prompts", "show", "notellm_category"]) == 0
    assert "[EMB]" in capsys.readouterr().out
    assert main(["prompts", "render", "item_summary", "--record", '{"id": "b1", "title": "Dune {{ 7*7 }}"}', "--model", str(tiny_model_dir)]) == 0
    text = capsys.readouterr().out
    assert "Title: Dune {{ 7*7 }}" in text and "<|im_start|>assistant" in text
    assert main(["prompts", "render", "item_summary", "--record", '{"id": "b2"}']) == 2
    assert "record 'b2' is missing required field 'title'" in capsys.readouterr().err


def test_eval_tags_cli_on_a_run(finished_run, tiny_model_dir, tmp_path, capsys):
    tmp, _ = finished_run
    # The synthetic ids 1..10 are goodbooks ids too: score them against their real shelves (split=all).
    assert main(["eval", "tags", "--pred", str(tmp / "out"), "--split", "all", "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    # the metric recomputed by hand from the run's own rows: hits among the first 5 cleaned tags / 5, over the
    # books of the run that have shelf truth (failed rows count as zero)
    from recforge.generate.tag_eval import read_truth
    from recforge.shelf_tags import clean_predicted

    truth = read_truth("sample://goodbooks_10k_book_tags/books_tags.jsonl.gz", split="all", top=10)
    pred = {r["id"]: json.loads(r["output"])["tags"] for r in read_generations(tmp / "out").to_pylist()}
    scored = [b for b in truth if b in {str(i) for i in (*range(1, 11), 900, 901)}]
    expected = sum(len(set(clean_predicted(pred.get(b, []))[:5]) & set(truth[b])) / 5 for b in scored) / len(scored)
    assert m["books"] == len(scored) and m["precision@5"] == pytest.approx(round(expected, 4), abs=1e-4)
    assert m["popular_baseline"]["precision@5"] > 0
    # model and baseline side by side, with the row counts and the model that made the tags
    assert f"model             precision@5 {m['precision@5']:.4f}  recall@5 {m['recall@5']:.4f}" in printed
    assert f"popular baseline  precision@5 {m['popular_baseline']['precision@5']:.4f}" in printed
    assert m["input_rows"] == 12 and m["failed_rows"] >= 2  # ids 900 and 901 cannot be generated
    assert m["output_rows"] + m["failed_rows"] == 12
    assert f"{m['output_rows']} generated, {m['failed_rows']} failed (of 12 inputs)" in printed
    assert m["model_used"]["name_or_path"] == str(tiny_model_dir) and m["model_used"]["note"] is None


def test_a_recipe_split_override_picks_the_heldout_books_and_is_recorded(tiny_model_dir, tmp_path):
    """`split.eval_percent.book=50`: `input.split: heldout` keeps exactly the books the shared rule holds out;
    the manifest and fingerprint record the rule, and `eval tags` scores the run against the same held-out books."""
    from recforge.generate.inputs import read_records
    from recforge.generate.tag_eval import read_truth
    from recforge.splits import SplitRule, describe, is_eval

    items = write_items(tmp_path / "items.jsonl", 40)  # ids 1..40: goodbooks ids, with real shelf tags
    path = recipe(tmp_path, tiny_model_dir, items, **{"input.split": "heldout", "input.split_entity": "book", "sampling.max_tokens": 4})
    rule = SplitRule(eval_percent={"book": 50})
    cfg = load_recipe(GenerateConfig, path, ["split.eval_percent.book=50"])
    assert cfg.split == rule
    want = [str(b) for b in range(1, 41) if is_eval("book", b, rule)]
    assert [i for i, _ in read_records(cfg, tmp_path / "rejects.jsonl")] == want and 10 < len(want) < 30
    default = [i for i, _ in read_records(load_recipe(GenerateConfig, path), tmp_path / "rejects.jsonl")]
    assert default == [str(b) for b in range(1, 41) if is_eval("book", b)] and set(default) < set(want)

    out = tmp_path / "out"
    assert main(["generate", str(path), "split.eval_percent.book=50", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_rule"] == {"source": "recipe", **rule.model_dump()}
    assert manifest["input_rows"] == len(want)
    assert json.loads((out / "fingerprint.json").read_text())["settings"]["split_rule"] == rule.model_dump()
    rows = read_generations(out).to_pylist() + failed_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(want)

    assert main(["eval", "tags", "--pred", str(out), "--split", "heldout", "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    truth = read_truth("sample://goodbooks_10k_book_tags/books_tags.jsonl.gz", split="heldout", top=10, rule=rule)
    assert m["split_rule"] == describe("book", rule)
    assert m["books"] == len(set(truth) & set(want)) > len(set(truth) & set(default))
