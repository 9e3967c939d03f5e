"""The one resume contract (recforge.run_contract) of generate (fingerprint.json) and embed (plan.json): one format,
one check, the same one-line refusal; folders written in either job's earlier format still resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recforge import run_contract
from recforge.cli import main
from recforge.config import RecforgeError

from test_generate_runner import recipe, write_items


@pytest.fixture(scope="module", autouse=True)
def digest_cache(tmp_path_factory):
    """Keep the sha256 cache of model files (recforge.fingerprint) out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def embed_recipe(tmp_path: Path, model: Path, catalogue: Path) -> Path:
    import yaml

    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "out_dir": str(tmp_path / "embed"), "shard_size": 2,
                                    "faiss_index": False,
                                    "catalogue": {"path": str(catalogue), "id": "book_id", "text_fields": ["title"]}}))
    return path


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recforge: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_changed_input_is_refused_with_the_same_line_by_generate_and_embed(tiny_model_dir, minilm_dir, tmp_path, capsys):
    """One input file read by both jobs; replaced at the same path between a kill and the resume: both refuse
    (exit 2) with the same line, naming the recipe key, the path and both digests; --overwrite starts over."""
    items = write_items(tmp_path / "items.jsonl", 4)
    generate = ["generate", str(recipe(tmp_path, tiny_model_dir, items, **{"sampling.max_tokens": 4})), "--no-progress"]
    embed = ["embed", str(embed_recipe(tmp_path, minilm_dir, items))]
    assert main(generate) == 0 and main(embed) == 0
    (tmp_path / "out" / "shards" / "part-00000.parquet").unlink()  # both killed before their last part
    (tmp_path / "embed" / "shards" / "part-00001.parquet").unlink()
    old = run_contract.input_digests({"f": items})["f"]
    write_items(items, 5)  # other content at the same path
    new = run_contract.input_digests({"f": items})["f"]
    capsys.readouterr()

    assert main(generate) == 2
    from_generate = error_line(capsys)
    assert main(embed) == 2
    from_embed = error_line(capsys)

    def expected(key: str, noun: str, out: str) -> str:
        return (f"recforge: error: {key} {items}: the {noun}'s content changed since the run in {tmp_path / out} started "
                f"(sha256 {old[:12]}… → {new[:12]}…); use a new out_dir, or --overwrite to start over")

    assert from_generate == expected("input.path", "input", "out")
    assert from_embed == expected("catalogue.path", "catalogue", "embed")
    assert main(generate + ["--overwrite"]) == 0 and main(embed + ["--overwrite"]) == 0


def test_one_format_for_both_jobs(tiny_model_dir, minilm_dir, tmp_path):
    items = write_items(tmp_path / "items.jsonl", 3)
    assert main(["generate", str(recipe(tmp_path, tiny_model_dir, items, **{"sampling.max_tokens": 4})), "--no-progress"]) == 0
    assert main(["embed", str(embed_recipe(tmp_path, minilm_dir, items))]) == 0
    generate = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    embed = json.loads((tmp_path / "embed" / "plan.json").read_text())
    for contract, job, key in ((generate, "generate", "input.path"), (embed, "embed", "catalogue.path")):
        assert set(contract) == {"job", "inputs", "model", "settings", "history"} and contract["job"] == job
        assert contract["inputs"] == {key: {"path": str(items), "sha256": run_contract.input_digests({"f": items})["f"]}}
        assert len(contract["model"]["digest"]) == 64 and contract["history"] == []


def flat_generate(contract: dict) -> dict:
    """fingerprint.json as generate wrote it before recforge.run_contract."""
    m = contract["model"]
    flat = {"model": m["path"], "revision": m["revision"], "model_digest": m["digest"], "adapter": m["adapter"],
            "adapter_digest": m["adapter_digest"], **contract["settings"]}
    return {"current": flat, "history": [], "input_digests": {k: v["sha256"] for k, v in contract["inputs"].items()}}


def flat_embed(contract: dict) -> dict:
    """plan.json as embed wrote it before recforge.run_contract."""
    return {"catalogue_sha256": contract["inputs"]["catalogue.path"]["sha256"], "model": contract["model"]["path"],
            "model_digest": contract["model"]["digest"], **contract["settings"]}


def test_folders_in_the_earlier_formats_resume(tiny_model_dir, minilm_dir, tmp_path):
    from recforge.align.align_config import EmbedConfig
    from recforge.align.embed import run_embed
    from recforge.config import load_recipe
    from recforge.generate.generate_config import GenerateConfig
    from recforge.generate.runner import run_generate

    items = write_items(tmp_path / "items.jsonl", 4)
    gen_cfg = load_recipe(GenerateConfig, recipe(tmp_path, tiny_model_dir, items, **{"sampling.max_tokens": 4}))
    first = run_generate(gen_cfg, progress=False)
    fingerprint = tmp_path / "out" / "fingerprint.json"
    fingerprint.write_text(json.dumps(flat_generate(json.loads(fingerprint.read_text()))))
    resumed = run_generate(gen_cfg, progress=False)
    assert resumed["progress"]["rows_done"] + resumed["progress"]["rows_failed"] == 0  # nothing redone
    assert resumed["fingerprint"] == first["fingerprint"] and resumed["fingerprint_history"] == []
    assert json.loads(fingerprint.read_text())["job"] == "generate"  # rewritten in the one format

    emb_cfg = load_recipe(EmbedConfig, embed_recipe(tmp_path, minilm_dir, items))
    run_embed(emb_cfg)
    plan = tmp_path / "embed" / "plan.json"
    contract = json.loads(plan.read_text())
    plan.write_text(json.dumps(flat_embed(contract)))
    assert run_embed(emb_cfg)["resumed_shards"] == 2
    assert json.loads(plan.read_text()) == contract


def contract(**over) -> dict:
    c = {"job": "generate", "inputs": {"input.path": {"path": "in.jsonl", "sha256": "a" * 64}},
         "model": {"path": "m", "digest": "d" * 64}, "settings": {"seed": 0, "sampling": {"n": 1}}}
    return {**c, **over}


def test_check_orders_inputs_first_and_force_never_accepts_another_input(tmp_path):
    path = tmp_path / "fingerprint.json"
    same = contract()
    assert run_contract.check(contract(), same, path) is None
    moved = contract(inputs={"input.path": {"path": "elsewhere.jsonl", "sha256": "a" * 64}})
    assert run_contract.check(contract(), moved, path) is None  # the content decides, not the path
    other = contract(inputs={"input.path": {"path": "in.jsonl", "sha256": "b" * 64}},
                     model={"path": "m", "digest": "e" * 64}, settings={"seed": 1, "sampling": {"n": 1}})
    line = run_contract.check(contract(), other, path, force=True, can_force=True)
    assert line.startswith("input.path in.jsonl: the input's content changed") and "\n" not in line
    reseeded = contract(model={"path": "m", "digest": "e" * 64}, settings={"seed": 1, "sampling": {"n": 1}})
    assert run_contract.changed_keys(contract(), reseeded) == ["model.digest", "seed"]
    assert re.search(r"fingerprint.json: an earlier run in this out_dir used a different fingerprint "
                     r"\(model.digest, seed\); .*--force", run_contract.check(contract(), reseeded, path, can_force=True))
    assert run_contract.check(contract(), reseeded, path, force=True, can_force=True) is None
    gone = contract(inputs={"input.path": {"path": "in.jsonl", "sha256": None}})
    assert run_contract.check(contract(), gone, path) is None  # a missing input: its reader names it


def test_save_load_and_an_unreadable_contract(tmp_path):
    path = tmp_path / "plan.json"
    assert run_contract.load(path) is None
    run_contract.save(path, contract(), history=[contract(job="x")])
    loaded = run_contract.load(path)
    assert {k: loaded[k] for k in run_contract.SECTIONS} == contract() and loaded["history"] == [contract(job="x")]
    path.write_text("{torn")
    with pytest.raises(RecforgeError, match=r"plan.json: not a readable run contract .*--overwrite"):
        run_contract.load(path)
