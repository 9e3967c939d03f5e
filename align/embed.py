"""`recforge embed RECIPE`: a catalogue -> Parquet (id, vector), resumable, + a faiss index.

- Length-sorted batching by *token* count (not characters) with a token budget per batch, so short
  titles go in big batches and long ones in small batches with little padding.
- The work is planned once and recorded as the run contract (`plan.json`, in the one format of
  `recforge.run_contract`: catalogue sha256, model path and content digest, and the settings: item order, shard
  boundaries, quantisation, ...); each shard is written atomically when complete. A killed run restarts from the
  first missing shard and can neither lose nor duplicate an id. A contract that no longer matches (other catalogue
  content, other model weights - also a model retrained in the same folder - or other settings) is refused.
- `quantize: int8`: vectors (L2-normalised) stored as int8 = round(127 * v). A fixed scale, not
  sentence-transformers' calibrated `quantize_embeddings`, because calibration ranges would differ from
  shard to shard and break resumability.
- `compute_dtype: bfloat16`: the encoder's arithmetic (bf16 weights: AMX on CPU, tensor cores on GPU); vectors
  are stored as above.
- A faiss inner-product index (`index.faiss` + `index_ids.json`) for nearest-neighbour lookups.
- Three steps, one plan and one part layout: plan (`start_embed`), encode parts (`encode_parts`), check + index
  (`finish_embed`). `recforge embed --ray --shards N` runs the middle step as N Ray tasks, shard i encoding the
  parts s with s % N == i (`recforge.align.embed_ray`); one process is that with N = 1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recforge import run_contract
from recforge.config import RecforgeError
from recforge.readers import RejectLog, SourceConfig, read_items
from recforge.io import atomic_write_json, write_parquet_atomic
from recforge.manifest import RunRecorder
from recforge.runstate import output_lock, require_complete

from .align_config import CatalogueSource, EmbedConfig


def item_text(row: dict, fields: list[str]) -> str:
    parts = []
    for f in fields:
        v = row.get(f)
        if v is None or v == "" or v == []:
            continue
        parts.append(", ".join(map(str, v)) if isinstance(v, list) else str(v))
    return " | ".join(parts)


def read_catalogue(src: CatalogueSource, rejects: RejectLog | None = None, limit: int | None = None) -> tuple[list[str], list[str], dict]:
    """(ids, texts, reject counts) through the shared readers, so bad rows are quarantined with the same
    file / line / reason / raw text as every other stage."""
    log = rejects if rejects is not None else RejectLog()
    items = read_items(SourceConfig(path=src.path, id=src.id, fields={f: f for f in src.text_fields}), log, "catalogue")
    if limit:
        items = items[:limit]
    return [it.item_id for it in items], [item_text(it.fields, src.text_fields) for it in items], dict(log.counts)


def token_lengths(model, texts: list[str], prompt: str | None) -> list[int]:
    tok = model[0].tokenizer
    prefixed = [prompt + t for t in texts] if prompt else texts
    enc = tok(prefixed, truncation=True, max_length=model.max_seq_length, add_special_tokens=True)
    return [len(x) for x in enc["input_ids"]]


def plan_batches(lengths: list[int], max_batch: int, token_budget: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Order items longest first; cut batches of at most `max_batch` items and `token_budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        longest = lengths[order[start]]
        size = max(1, min(max_batch, token_budget // max(1, longest)))
        batches.append((start, min(start + size, len(order))))
        start += size
    return order, batches


def embed_batches(lengths: list[int], batch_size: int) -> tuple[list[int], list[tuple[int, int]]]:
    """recforge's batch plan: longest first, at most 2 x `batch_size` items and 2 x `batch_size` items of median
    length in padded tokens per batch (short items fill bigger batches, long ones smaller). The previous 4x cap
    was slower than sentence-transformers for SmolLM2 in bf16 (bench/align_embed.py, README)."""
    budget = 2 * batch_size * max(8, int(np.median(lengths))) if lengths else 1
    return plan_batches(lengths, 2 * batch_size, budget)


def encode_sorted(model, texts: list[str], batches: list[tuple[int, int]], prompt: str | None, progress=None) -> np.ndarray:
    """Encode already length-sorted texts batch by batch through the model's own preprocess/forward."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for a, b in batches:
            features = model.preprocess(texts[a:b], prompt=prompt)
            emb = model(features)["sentence_embedding"]
            out.append(emb.float().cpu().numpy())
            if progress is not None:
                progress.update(b - a)
    return np.concatenate(out) if out else np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)


def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when a CUDA device is present, else `cpu`; an explicit device that is absent is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecforgeError(f"device: {device} asked for, but torch sees no CUDA device (use device=auto or cpu)")
    return device


def checked_model_folder(path: str, what: str = "model") -> str:
    """The folder of an encoder to load (aliases resolved), after `recforge.models.check_model_folder`."""
    from recforge.models import check_model_folder, resolve_model

    path = resolve_model(path)  # `minilm` (and the offline LLM aliases) -> the model folder
    if not Path(path).is_dir():
        raise RecforgeError(f"{what}: not a folder: {path}")
    check_model_folder(path, what)
    return path


def load_model(path: str, max_seq_length: int | None = None, device: str = "auto", compute_dtype: str = "float32",
               what: str = "model"):
    path = checked_model_folder(path, what)  # before the (slow) import: a refused folder is refused at once
    device = resolve_device(device)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device=device)
    except Exception as err:  # a hostile or broken folder: many loader exception types, one line for the user
        raise RecforgeError(f"{what} {path}: does not load as a sentence-transformers model: "
                            f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}") from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return with_compute_dtype(model, compute_dtype)


def with_compute_dtype(model, compute_dtype: str):
    """bfloat16: the weights cast (sentence-transformers' own `.bfloat16()`); vectors come back as float32."""
    return model.bfloat16() if compute_dtype == "bfloat16" else model


def vectors_table(ids: list[str], vecs: np.ndarray, quantize: str):
    import pyarrow as pa

    if quantize == "int8":
        # Not ST's quantize_embeddings(int8, ranges=catalogue min/max): held-out ESCI recall@10 (MiniLM, 42 queries) 0.7173
        # vs ours 0.7411, float32 0.7173 - off ours by more than 0.002, though closer to float32 (issue 26, measured).
        norm = vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        q = np.clip(np.rint(norm * 127.0), -127, 127).astype(np.int8)
        col = pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1), pa.int8()), vecs.shape[1])
    else:
        col = pa.FixedSizeListArray.from_arrays(pa.array(vecs.astype(np.float32).reshape(-1), pa.float32()), vecs.shape[1])
    return pa.table({"id": pa.array(ids, pa.string()), "vector": col})


def read_vectors(out_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All (id, vector) rows of an embed output, int8 vectors dequantised (÷127)."""
    import pyarrow.parquet as pq

    files = sorted((Path(out_dir) / "shards").glob("part-*.parquet"))
    ids, vecs = [], []
    for f in files:
        t = pq.read_table(f)
        ids.extend(t.column("id").to_pylist())
        arr = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False))
        dim = t.schema.field("vector").type.list_size
        arr = arr.reshape(-1, dim)
        vecs.append(arr.astype(np.float32) / 127.0 if arr.dtype == np.int8 else arr)
    return ids, (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32))


def build_faiss_index(out_dir: Path, ids: list[str], vecs: np.ndarray) -> Path:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    tmp = out_dir / ".index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(out_dir / "index.faiss")
    atomic_write_json(out_dir / "index_ids.json", ids)
    return out_dir / "index.faiss"


def nearest(out_dir: str | Path, query_vectors: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
    """Top-k (id, inner product) from an embed output's faiss index."""
    import faiss

    index = faiss.read_index(str(Path(out_dir) / "index.faiss"))
    ids = json.loads((Path(out_dir) / "index_ids.json").read_text())
    scores, idx = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
    return [[(ids[j], float(s)) for j, s in zip(row_i, row_s) if j >= 0] for row_i, row_s in zip(idx, scores)]


REJECTS, PLAN = "rejects.jsonl", "plan.json"
# Where `recforge embed --ray` keeps each shard's progress.json (recforge.align.embed_ray).
PROGRESS_DIR = "progress"
# What an earlier run left in out_dir that `overwrite` discards (the lock, the manifest and the config are rewritten).
PREVIOUS_OUTPUTS = (PLAN, "shards", "index.faiss", "index_ids.json", REJECTS, PROGRESS_DIR, "progress.json")


@dataclass
class EmbedWork:
    """What the plan fixes - the items in encoding order, the batches and the part boundaries - and the encoder.

    Derived from the catalogue and the model alone, so the driver of a Ray job and each of its shard workers
    derive the very same work; `contract` is what `plan.json` records of it (and what a worker checks it against)."""

    ids: list[str]  # catalogue order: what the coverage check compares the parts with
    sorted_ids: list[str]
    sorted_texts: list[str]
    batches: list[tuple[int, int]]
    parts: list[tuple[int, int]]  # part s holds sorted items [a, b): shards/part-{s:05d}.parquet
    contract: dict
    model: Any
    prompt: str | None
    reject_counts: dict


def part_path(shard_dir: Path, s: int) -> Path:
    return shard_dir / f"part-{s:05d}.parquet"


def shard_parts(n_parts: int, index: int, count: int) -> list[int]:
    """The parts shard `index`/`count` encodes: every count-th part (the parts of one layout, whatever N is)."""
    return [s for s in range(n_parts) if s % count == index]


def prepare_work(cfg: EmbedConfig, rejects: RejectLog, device: str | None = None,
                 compute_dtype: str | None = None) -> EmbedWork:
    """Read the catalogue, load the encoder and plan the work (no write to out_dir). `device` / `compute_dtype`
    override the recipe's for a process that only plans (the plan depends on the tokenizer, not on them)."""
    require_complete(cfg.catalogue.path, "catalogue.path")
    try:
        ids, texts, reject_counts = read_catalogue(cfg.catalogue, rejects, cfg.limit)
    finally:
        rejects.close()
    if not ids:
        raise RecforgeError(f"{cfg.catalogue.path}: no usable items")
    model = load_model(cfg.model, cfg.max_seq_length, device or cfg.device, compute_dtype or cfg.compute_dtype)
    prompt = (model.prompts or {}).get(cfg.catalogue.prompt_name) if cfg.catalogue.prompt_name else None
    if cfg.catalogue.prompt_name and prompt is None:
        raise RecforgeError(f"catalogue.prompt_name: the model has no prompt {cfg.catalogue.prompt_name!r} "
                            f"(it has {sorted(model.prompts or {})})")

    if cfg.sort_by_length:
        order, batches = embed_batches(token_lengths(model, texts, prompt), cfg.batch_size)
    else:
        order = list(range(len(texts)))
        batches = [(i, min(i + cfg.batch_size, len(texts))) for i in range(0, len(texts), cfg.batch_size)]
    sorted_ids = [ids[i] for i in order]
    sorted_texts = [texts[i] for i in order]
    parts = [(a, min(a + cfg.shard_size, len(order))) for a in range(0, len(order), cfg.shard_size)]
    from recforge.models import resolve_model

    contract = run_contract.make(
        # the content, not the path: a catalogue replaced between a kill and the resume must not resume
        "embed", {"catalogue.path": cfg.catalogue.path},
        # The weights' content, not just the path: a model retrained into the same folder must not resume.
        {"path": str(Path(cfg.model).resolve()) if cfg.model != "minilm" else "minilm",
         "digest": run_contract.model_digest(resolve_model(cfg.model))},
        {"ids_sha256": hashlib.sha256("\n".join(sorted_ids).encode()).hexdigest(),
         "shards": len(parts), "shard_size": cfg.shard_size, "quantize": cfg.quantize,
         # other arithmetic gives other vectors: a resume must not mix them in one output
         **({"compute_dtype": cfg.compute_dtype} if cfg.compute_dtype != "float32" else {}),
         "prompt": prompt, "max_seq_length": model.max_seq_length})
    return EmbedWork(ids, sorted_ids, sorted_texts, batches, parts, contract, model, prompt, reject_counts)


def encode_parts(work: EmbedWork, shard_dir: Path, parts: list[int], quantize: str, progress=None,
                 after_part: Callable[[int, int], None] | None = None) -> int:
    """Encode the given parts that are not on disk yet, each written atomically; returns the items encoded.

    A part on disk is never encoded again, so a killed (or retried) run resumes and no id is written twice."""
    encoded = 0
    for s in parts:
        path = part_path(shard_dir, s)
        if path.is_file():
            continue
        a, b = work.parts[s]
        part_batches = [(max(x, a) - a, min(y, b) - a) for x, y in work.batches if x < b and y > a]
        vecs = encode_sorted(work.model, work.sorted_texts[a:b], part_batches, work.prompt, progress)
        write_parquet_atomic(vectors_table(work.sorted_ids[a:b], vecs, quantize), path)
        encoded += b - a
        if after_part is not None:
            after_part(s, b - a)
    return encoded


def run_embed(cfg: EmbedConfig, overwrite: bool = False) -> dict:
    """Embed the catalogue into out_dir, resuming an earlier run there with the same plan.

    One writer at a time (`output_lock`). Every check (catalogue, model, plan) runs before anything is written:
    a refused resume leaves the previous run's files byte-identical. `overwrite` discards an earlier run's
    outputs instead of refusing a changed plan. The work: plan (`start_embed`), encode every part
    (`encode_parts`), check and index (`finish_embed`); `recforge embed --ray` runs the middle step as N Ray tasks."""
    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir, "embed"):
        staged = out_dir / f".{REJECTS}.partial"
        try:
            return _run_embed(cfg, out_dir, staged, overwrite)
        finally:
            staged.unlink(missing_ok=True)


# plan.json's model keys before `recforge.run_contract` (a flat dict with `catalogue_sha256`)
LEGACY_MODEL_KEYS = {"model": "path", "model_digest": "digest"}


def upgrade_legacy_plan(old: dict) -> dict:
    """plan.json as written before `recforge.run_contract`: one flat dict."""
    flat = {k: v for k, v in old.items() if k != "catalogue_sha256"}
    return run_contract.from_flat("embed", flat, LEGACY_MODEL_KEYS, {"catalogue.path": old["catalogue_sha256"]})


def load_plan(plan_path: Path) -> dict | None:
    return run_contract.load(plan_path, upgrade_legacy_plan)


def _check_plan(plan_path: Path, contract: dict, overwrite: bool) -> None:
    """Pass when out_dir holds no earlier run, or one under this very contract (a resume). Another one is refused
    with `recforge.run_contract.check`'s line (a changed catalogue first); with `overwrite` the earlier outputs are
    removed instead."""
    try:
        previous = load_plan(plan_path)
        problem = None if previous is None else run_contract.check(previous, contract, plan_path)
    except RecforgeError as err:  # not a contract at all: not written by a run that checked it
        problem = str(err)
    if problem is None:
        return
    if not overwrite:
        raise RecforgeError(problem)
    for name in PREVIOUS_OUTPUTS:
        target = plan_path.parent / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def start_embed(cfg: EmbedConfig, out_dir: Path, staged_rejects: Path, overwrite: bool, command: str = "embed",
                device: str | None = None, compute_dtype: str | None = None) -> tuple[EmbedWork, RunRecorder]:
    """(a) Plan the work and take over out_dir's bookkeeping; the caller holds out_dir's lock.

    A changed catalogue or model is refused (or, with `overwrite`, the earlier outputs are discarded) before
    anything is written; then `plan.json`, the run's rejects and a running manifest."""
    staged_rejects.unlink(missing_ok=True)  # a killed run's leftovers: this run's rejects only
    work = prepare_work(cfg, RejectLog(staged_rejects), device, compute_dtype)
    plan_path = out_dir / PLAN
    _check_plan(plan_path, work.contract, overwrite)

    # The checks passed: from here on this run owns out_dir's bookkeeping.
    run = RunRecorder(out_dir, command, cfg)
    staged_rejects.touch()
    staged_rejects.replace(out_dir / REJECTS)  # per run: a rerun's rejects replace the previous run's
    run.rejects.update(work.reject_counts)
    run.add_input(cfg.catalogue.path, name="catalogue", rows=len(work.ids))
    run_contract.save(plan_path, work.contract)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    return work, run


def parts_on_disk(work: EmbedWork, shard_dir: Path) -> list[int]:
    return [s for s in range(len(work.parts)) if part_path(shard_dir, s).is_file()]


def items_in(work: EmbedWork, parts: list[int]) -> int:
    return sum(work.parts[s][1] - work.parts[s][0] for s in parts)


def finish_embed(cfg: EmbedConfig, out_dir: Path, work: EmbedWork, run: RunRecorder, extra: dict) -> tuple[int, dict]:
    """(c) Once every part is on disk: check that the parts cover the catalogue exactly once, build the faiss
    index, and write the manifest (`status: complete`) last. Returns (rows, manifest)."""
    shard_dir = out_dir / "shards"
    all_ids, all_vecs = read_vectors(out_dir)
    if len(all_ids) != len(set(all_ids)) or set(all_ids) != set(work.ids):
        raise RecforgeError(f"{shard_dir}: shards do not cover the catalogue exactly once; delete {out_dir} and rerun")
    run.add_output("vectors", shard_dir, rows=len(all_ids), dim=int(all_vecs.shape[1]), quantize=cfg.quantize)
    if cfg.faiss_index:
        run.add_output("faiss_index", build_faiss_index(out_dir, all_ids, all_vecs), rows=len(all_ids))
    run.extra.update(extra)
    return len(all_ids), run.finish()


def _run_embed(cfg: EmbedConfig, out_dir: Path, staged_rejects: Path, overwrite: bool) -> dict:
    from tqdm.auto import tqdm

    work, run = start_embed(cfg, out_dir, staged_rejects, overwrite)
    shard_dir = out_dir / "shards"
    done = parts_on_disk(work, shard_dir)
    progress = tqdm(total=len(work.sorted_ids), initial=items_in(work, done), unit="item", desc="embed",
                    smoothing=0.1, mininterval=1.0)
    started = time.perf_counter()
    encoded = encode_parts(work, shard_dir, shard_parts(len(work.parts), 0, 1), cfg.quantize, progress)
    progress.close()
    elapsed = time.perf_counter() - started
    items_per_s = encoded / elapsed if encoded and elapsed > 0 else 0.0

    rows, _ = finish_embed(cfg, out_dir, work, run, {
        "device": str(work.model.device), "items_per_s": items_per_s, "encoded_this_run": encoded,
        "resumed_shards": len(done), "batches": len(work.batches), "sorted_by_tokens": cfg.sort_by_length})
    return {"rows": rows, "out_dir": str(out_dir), "items_per_s": items_per_s, "resumed_shards": len(done)}
