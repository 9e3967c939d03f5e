"""Two gloo CPU processes (torchrun, as `accelerate launch` runs them) for `recforge sft` and `recforge align`:
the ranks share the training (each takes its shard), but only rank 0 evaluates, merges / exports and writes.

Every file a rank writes, renames or deletes in the run folder is logged by an audit hook (`sitecustomize` on the
launched processes' path), so "rank 1 wrote nothing" and "the manifest was written once" are checked, not inferred.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_recipes" / "samples"

# Python's audit events for writes: open() / os.open for writing, os.rename (also os.replace), os.remove,
# shutil.rmtree. Files written from Rust (safetensors, tokenizers) raise none; the JSON / YAML / README beside them do.
WRITE_AUDIT = '''
import os, sys
if os.environ.get("RANK") is not None and os.environ.get("RECFORGE_AUDIT_WATCH"):
    _watch = os.environ["RECFORGE_AUDIT_WATCH"]
    _log = open(os.path.join(os.environ["RECFORGE_AUDIT_LOG"], "writes.rank%s.txt" % os.environ["RANK"]), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (mode is None and (flags or 0) & _WRITE):
                return
        elif event == "os.rename":
            path = args[1]
        elif event in ("os.remove", "shutil.rmtree"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            if p.startswith(_watch):
                _log.write(event + " " + p + "\\n")

    sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(tmp_path: Path, out: Path, *argv: str) -> dict[int, list[tuple[str, Path]]]:
    """`torchrun --nproc_per_node 2 -m recforge ARGV` (gloo on CPU); returns each rank's writes under `out`."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) not found"
    hook_dir, logs = tmp_path / "audit_hook", tmp_path / "audit_logs"
    hook_dir.mkdir()
    logs.mkdir()
    (hook_dir / "sitecustomize.py").write_text(WRITE_AUDIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
           "RECFORGE_AUDIT_WATCH": str(out.resolve()), "RECFORGE_AUDIT_LOG": str(logs)}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "recforge", *argv],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    writes = {}
    for rank in (0, 1):
        log = logs / f"writes.rank{rank}.txt"
        assert log.is_file(), f"rank {rank} never started"  # the hook opens its log at start-up
        writes[rank] = [(e, Path(p)) for e, p in (line.split(" ", 1) for line in log.read_text().splitlines())]
    return writes


def jsonl_with_a_bad_line(src: Path, dst: Path, n: int | None = None) -> Path:
    """The first `n` rows of a shipped sample plus one malformed line (one reject: counted once, logged once)."""
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = list(itertools.islice(f, n))
    dst.write_text("".join(rows) + "{not json\n", encoding="utf-8")
    return dst


def check_written_once(out: Path, writes: dict, manifest: dict) -> None:
    assert writes[1] == [], f"rank 1 wrote into the run folder: {writes[1][:5]}"
    replaced = [p for e, p in writes[0] if e == "os.rename"]
    # the manifest is written twice, by rank 0 only: "running" when the run starts writing, "complete" last
    assert replaced.count(out.resolve() / "manifest.json") == 2
    assert replaced.count(out.resolve() / "resolved_config.yaml") == 1
    assert manifest["world_size"] == 2
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written leftovers
    rejects = (out / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == manifest["rejects"]["total"] == 1  # one bad input line, logged by one rank


def test_sft_on_two_processes_trains_on_shards_and_rank0_writes_one_model(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    books = jsonl_with_a_bad_line(SAMPLES / "goodbooks_10k_book_tags" / "books_tags.jsonl.gz", tmp_path / "books.jsonl", 60)
    out = tmp_path / "sft"
    writes = launch_two(tmp_path, out, "sft", str(REPO / "finetune/recipes/sft_goodbooks_tags_tiny.yaml"),
                        f"model.path={tiny_model_dir}", f"out_dir={out}", f"tags.books={books}", "mode=lora", "merge=true",
                        "training.num_train_epochs=1", "training.per_device_train_batch_size=4", "training.save_steps=1000",
                        "max_train_examples=32", "max_eval_examples=4", "max_new_tokens=4")
    manifest = json.loads((out / "manifest.json").read_text())
    check_written_once(out, writes, manifest)
    # one epoch of 32 examples, 4 per device: 4 steps when the 2 ranks take half each (8 if each took them all)
    assert manifest["train"]["steps"] == 4 and manifest["train"]["global_batch_size"] == 8
    assert manifest["train"]["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 32 and metrics["n_eval"] == 4 and metrics["merge_max_logit_diff"] <= 1e-3
    assert len(json.loads((out / "eval_ids.json").read_text())["eval_ids"]) == 4

    # exactly one adapter and one merged model, and what generate / vLLM load (merged/) loads and runs
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts) == [
        "merged/model.safetensors", "model/adapter_model.safetensors"]
    tok = AutoTokenizer.from_pretrained(out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        logits = merged(**tok(["Book: Dune by Frank Herbert"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_align_on_two_processes_trains_on_shards_and_rank0_exports_one_model(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    queries = jsonl_with_a_bad_line(SAMPLES / "esci_us_titles" / "queries.jsonl.gz", tmp_path / "queries.jsonl")
    out = tmp_path / "align"
    writes = launch_two(tmp_path, out, "align", str(REPO / "align/recipes/esci_tiny_lm.yaml"),
                        f"backbone.path={tiny_model_dir}", f"out_dir={out}", f"data.esci.queries={queries}",
                        "train.num_train_epochs=1", "train.per_device_train_batch_size=16", "data.max_train_pairs=64", "backbone.max_seq_length=24",
                        "train.no_duplicates_sampler=false", "eval.k_values=[1,10]")
    manifest = json.loads((out / "manifest.json").read_text())
    check_written_once(out, writes, manifest)
    # 64 pairs, 16 per device: 2 steps when the 2 ranks take half each (4 if each took them all)
    assert manifest["train"]["steps"] == 2 and manifest["train"]["world_size"] == 2
    assert manifest["train"]["global_batch_size"] == 32
    assert set(manifest["metrics"]) == {"base", "tuned"}
    assert json.loads((out / "eval" / "retrieval_metrics.json").read_text())["results"]["tuned"]["queries"] > 30

    # one exported folder; plain sentence-transformers loads it and encodes
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("modules.json")) == ["model/modules.json"]
    model = SentenceTransformer(str(out / "model"), device="cpu")
    vectors = model.encode(["running shoes", "Nike Air Zoom Pegasus"], prompt_name="query")
    assert vectors.shape == (2, 128)
