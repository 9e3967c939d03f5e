"""`recforge generate`: records -> prompts -> engine -> parse -> validate -> retry -> Parquet shards.

Layout of `out_dir` (or `out_dir/shard-IIIII-of-NNNNN` with `--shard i/N`):
    fingerprint.json          what produced the rows (model, template hash, sampling, engine, adapter, ...)
    shards/part-KKKKK.parquet one file per chunk of `chunk_size` input rows, written atomically
    failed.jsonl              rows that failed every attempt, with the reason (one line per id)
    rejects.jsonl             malformed input rows (never silently dropped)
    progress.json             rows/s, tokens/s, failure rate, ETA (updated after each chunk)
    resolved_config.yaml, manifest.json

Resume: chunk k always holds the same input rows (input order, after split/shard/limit). A chunk is done
when its shard file exists; its failures are appended to failed.jsonl just before the shard is renamed
into place, and failure lines of chunks without a shard are dropped on restart. So a run killed at any
point and restarted ends with every input id exactly once: in a shard or in failed.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recforge.config import RecforgeError
from recforge.generate.engine import GenerationRequest, Sampling, constraint_from_output
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.parsing import ParseError, parse_output
from recforge.generate.splits import book_split, id_hash, shard_of
from recforge.io import atomic_write_json, open_text, resolve_path, write_parquet_atomic

NO_RETRY = ("prompt_too_long", "render_error")


def output_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("entity_type", pa.string()),
            ("task", pa.string()),
            ("output", pa.string()),  # JSON of the first valid completion's value
            ("outputs", pa.list_(pa.string())),  # JSON of every valid completion (n > 1)
            ("raw", pa.string()),
            ("finish_reason", pa.string()),
            ("attempts", pa.int32()),
            ("seed", pa.int64()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
        ]
    )


# ------------------------------------------------------------------ inputs


def read_records(cfg: GenerateConfig, rejects_path: Path) -> list[tuple[str, dict]]:
    """(id, record) pairs in input order, after split and limit."""
    inp = cfg.input
    if inp.kind == "items":
        from recforge.data_recipes.readers import RejectLog, SourceConfig, read_items

        src = SourceConfig(path=inp.path, format=inp.format, id=inp.id, fields=inp.fields)
        rejects = RejectLog(path=rejects_path)
        try:
            items = read_items(src, rejects, name="input")
        finally:
            rejects.close()
        pairs = [(it.item_id, {**inp.constants, **it.fields}) for it in items]
    else:
        pairs = _read_jsonl_records(inp, rejects_path)
        if inp.history is not None:
            pairs = _attach_history(pairs, inp.history, rejects_path)
    if inp.split != "all":
        pairs = [(i, r) for i, r in pairs if book_split(i) == inp.split]
    if inp.limit:
        pairs = pairs[: inp.limit]
    return pairs


def _read_jsonl_records(inp, rejects_path: Path) -> list[tuple[str, dict]]:
    from recforge.io import JsonlAppender

    path = resolve_path(inp.path)
    if not path.is_file():
        raise RecforgeError(f"input.path: file not found: {inp.path}")
    pairs, seen = [], set()
    with open_text(path, errors="replace") as f, JsonlAppender(rejects_path) as rejects:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                rejects.write({"file": str(path), "line": line_no, "reason": "invalid_json", "raw": line[:2000]})
                continue
            rid = row.get(inp.id)
            if rid is None or str(rid).strip() == "":
                rejects.write({"file": str(path), "line": line_no, "reason": "missing_id", "raw": line[:2000]})
                continue
            rid = str(rid)
            if rid in seen:
                rejects.write({"file": str(path), "line": line_no, "reason": "duplicate_id", "raw": line[:2000]})
                continue
            seen.add(rid)
            fields = {k: row.get(col) for k, col in inp.fields.items()} if inp.fields else row
            pairs.append((rid, {**inp.constants, **fields}))
    return pairs


def kar_prefix_length(n: int) -> int:
    """KAR's leakage guard: the first min((n+1)//2, 30) interactions feed the prompt, the rest stay for CTR."""
    return min((n + 1) // 2, 30)


def _attach_history(pairs, h, rejects_path: Path) -> list[tuple[str, dict]]:
    from recforge.io import JsonlAppender

    titles: dict[str, str] = {}
    with open_text(resolve_path(h.items_path)) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                titles[str(row[h.item_id])] = str(row.get(h.title_field) or "")
    out = []
    with JsonlAppender(rejects_path) as rejects:
        for rid, rec in pairs:
            ids = rec.get(h.ids_column) or []
            ratings = rec.get(h.ratings_column) if h.ratings_column else None
            ratings = ratings if isinstance(ratings, list) and len(ratings) == len(ids) else [None] * len(ids)
            keep = kar_prefix_length(len(ids)) if h.kar_prefix else len(ids)
            history = [{"title": titles[str(i)], "rating": r} for i, r in zip(ids[:keep], ratings[:keep]) if titles.get(str(i))]
            if len(history) < h.min_events:
                rejects.write({"id": rid, "reason": "short_history", "detail": f"{len(history)} known events < min_events={h.min_events}"})
                continue
            out.append((rid, {**rec, "history": history}))
    return out


# ------------------------------------------------------------------ model + engine


def resolve_model(cfg: GenerateConfig) -> dict[str, Any]:
    """The model actually used: name_or_path, or the fallback where it is a missing local path.

    An adapter-only folder (adapter_config.json, no config.json) is served as base + adapter.
    """
    m = cfg.model
    name, note = m.name_or_path, None
    # A hub id is "org/name"; a path has a leading ./ / ~ runs/ or several slashes.
    path_like = name.startswith((".", "/", "~", "runs/")) or name.count("/") >= 2
    if path_like and not resolve_path(name).exists():
        if not m.fallback:
            raise RecforgeError(f"model.name_or_path: {name} does not exist (and no model.fallback is set)")
        note = f"{name} does not exist; using model.fallback {m.fallback}"
        name = m.fallback
    adapter = m.adapter
    p = resolve_path(name)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        adapter, name = str(p), base
    return {"name_or_path": name, "adapter": adapter, "note": note, "revision": m.revision}


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """Revision or content digest of the model and adapter (part of the fingerprint)."""

    def digest(path: str | None) -> str | None:
        if not path:
            return None
        p = resolve_path(path)
        if not p.is_dir():
            return None  # a hub id: the revision identifies it
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".model", ".jinja", ".txt"):
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.stat().st_size < 64 << 20:  # small files fully; big weight files by name + size
                    h.update(f.read_bytes())
        return h.hexdigest()

    return {
        "model": model["name_or_path"],
        "revision": model["revision"],
        "model_digest": digest(model["name_or_path"]),
        "adapter": model["adapter"],
        "adapter_digest": digest(model["adapter"]),
    }


def build_engine(cfg: GenerateConfig, model: dict[str, Any]):
    e, m = cfg.engine, cfg.model
    if e.kind == "vllm":
        from recforge.generate.vllm_engine import VLLMEngine

        return VLLMEngine(
            model["name_or_path"], revision=model["revision"], adapter=model["adapter"],
            tensor_parallel_size=e.tensor_parallel_size, max_model_len=e.max_model_len,
            gpu_memory_utilization=e.gpu_memory_utilization, dtype=m.dtype,
            trust_remote_code=m.trust_remote_code, seed=cfg.seed,
        )
    from recforge.generate.transformers_engine import TransformersEngine

    try:
        return TransformersEngine(
            model["name_or_path"], revision=model["revision"], adapter=model["adapter"], dtype=m.dtype,
            device=e.device, batch_size=e.batch_size, max_model_len=e.max_model_len,
            trust_remote_code=m.trust_remote_code, cpu_threads=e.cpu_threads,
        )
    except OSError as err:
        raise RecforgeError(f"model.name_or_path: cannot load {model['name_or_path']!r}: {err}") from None


def engine_version(kind: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version("vllm" if kind == "vllm" else "transformers")
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------ the run


@dataclass
class ShardSpec:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "ShardSpec":
        if not text:
            return cls()
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise RecforgeError(f"--shard {text!r}: expected i/N, e.g. 0/8") from None
        if n < 1 or not 0 <= i < n:
            raise RecforgeError(f"--shard {text!r}: need 0 <= i < N")
        return cls(i, n)


def row_seed(base: int, shard: ShardSpec, record_id: str, attempt: int) -> int:
    """Per-row seed: the run seed, the shard's offset, the id, the attempt (a retry draws new randomness)."""
    return (base + shard.index * 1_000_003 + id_hash(record_id) % 1_000_000_007 + attempt * 7_919) % (2**31 - 1)


def effective_sampling(cfg: GenerateConfig, spec) -> dict[str, Any]:
    s = spec.sampling.model_dump()
    for k, v in cfg.sampling.model_dump().items():
        if v is not None:
            s[k] = v
    return s


def resolve_taxonomy(cfg: GenerateConfig) -> list[str] | None:
    t = cfg.taxonomy
    if t is None:
        return None
    if t.tags:
        return list(t.tags)
    if t.from_book_tags:
        from recforge.generate.tag_eval import top_train_tags

        return top_train_tags(t.from_book_tags, t.top)
    return None


class GenerationRun:
    def __init__(self, cfg: GenerateConfig, shard: ShardSpec, force: bool = False, progress: bool = True):
        from recforge.prompts import load_prompt

        self.cfg, self.shard, self.force, self.show_progress = cfg, shard, force, progress
        base = Path(cfg.out_dir)
        self.out = base if shard.count == 1 else base / f"shard-{shard.index:05d}-of-{shard.count:05d}"
        self.template = load_prompt(cfg.task)
        self.variables = dict(cfg.prompt_vars)
        taxonomy = resolve_taxonomy(cfg)
        if taxonomy:
            self.variables["taxonomy"] = taxonomy
        self.output_spec = self.template.output_for(self.variables)
        self.constraint = constraint_from_output(self.output_spec)
        self.sampling = effective_sampling(cfg, self.template.spec)
        self.model = resolve_model(cfg)

    # ---------------------------------------------------------------- fingerprint
    def fingerprint(self) -> dict[str, Any]:
        return {
            **model_identity(self.model),
            "task": self.template.name,
            "template_version": self.template.spec.version,
            "template_hash": self.template.template_hash,
            "output": json.loads(self.output_spec.model_dump_json(by_alias=True)),
            "prompt_vars": self.variables,
            "sampling": self.sampling,
            "seed": self.cfg.seed,
            "max_retries": self.cfg.max_retries,
            "retry_temperature": self.cfg.retry_temperature,
            "engine": self.cfg.engine.kind,
            "engine_version": engine_version(self.cfg.engine.kind),
            "input": self.cfg.input.model_dump(),
            "chunk_size": self.cfg.chunk_size,
            "shard": f"{self.shard.index}/{self.shard.count}",
        }

    def check_fingerprint(self, fp: dict[str, Any]) -> list[dict]:
        """Refuse to resume into rows made differently, unless --force; returns the fingerprint history."""
        path = self.out / "fingerprint.json"
        history: list[dict] = []
        if path.is_file():
            old = json.loads(path.read_text())
            history = old.get("history", [])
            prev = old.get("current", old)
            diff = sorted(k for k in set(prev) | set(fp) if prev.get(k) != fp.get(k))
            if diff:
                if not self.force:
                    raise RecforgeError(
                        f"{self.out} holds rows made with another fingerprint (differs in: {', '.join(diff)}); "
                        "use a new out_dir, --overwrite to start over, or --force to resume anyway (both fingerprints are recorded)"
                    )
                history.append(prev)
        atomic_write_json(path, {"current": fp, "history": history})
        return history

    def discard_outputs(self) -> None:
        """--overwrite: remove the rows, failures and fingerprint of a previous run in this folder (only those)."""
        import shutil

        if (self.out / "shards").is_dir():
            shutil.rmtree(self.out / "shards")
        for name in ("failed.jsonl", "fingerprint.json", "progress.json", "rejects.jsonl"):
            (self.out / name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- resume state
    def done_chunks(self) -> set[int]:
        shards = self.out / "shards"
        for tmp in shards.glob(".part-*.tmp") if shards.is_dir() else []:
            tmp.unlink()  # a half-written shard of a killed run (never renamed into place)
        return {int(p.stem.split("-")[1]) for p in shards.glob("part-*.parquet")} if shards.is_dir() else set()

    def clean_failed_log(self, done: set[int]) -> int:
        """Keep failure lines of finished chunks only (a torn last line or a redone chunk's lines go)."""
        path = self.out / "failed.jsonl"
        if not path.is_file():
            return 0
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("chunk") in done:
                kept.append(line)
        from recforge.io import atomic_write_text

        atomic_write_text(path, "".join(k + "\n" for k in kept))
        return len(kept)

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict[str, Any]:
        from recforge.io import JsonlAppender
        from recforge.manifest import RunRecorder

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        recorder = RunRecorder(self.out, "generate", cfg, seed=cfg.seed)
        fp = self.fingerprint()
        history = self.check_fingerprint(fp)
        records = read_records(cfg, self.out / "rejects.jsonl")
        recorder.add_input(cfg.input.path, name="input", rows=len(records))
        if self.shard.count > 1:
            records = [(i, r) for i, r in records if shard_of(i, self.shard.count) == self.shard.index]
        chunks = [records[k : k + cfg.chunk_size] for k in range(0, len(records), cfg.chunk_size)]
        done = self.done_chunks()
        self.clean_failed_log(done)
        todo = [k for k in range(len(chunks)) if k not in done]
        if self.model["note"]:
            print(f"recforge generate: {self.model['note']}", file=sys.stderr)
        stats = {"rows_done": 0, "rows_failed": 0, "completion_tokens": 0, "prompt_tokens": 0}
        rows_todo = sum(len(chunks[k]) for k in todo)
        start = time.time()
        engine = build_engine(cfg, self.model) if todo else None
        bar = None
        if self.show_progress:
            from tqdm import tqdm

            bar = tqdm(total=rows_todo, unit="row", desc=f"generate {self.template.name}", file=sys.stderr)
        with JsonlAppender(self.out / "failed.jsonl") as failed_log:
            for k in todo:
                rows, failures = self.run_chunk(engine, chunks[k], k, stats)
                for f in failures:
                    failed_log.write(f)
                failed_log.flush()
                import pyarrow as pa

                write_parquet_atomic(pa.Table.from_pylist(rows, schema=output_schema()), self.out / "shards" / f"part-{k:05d}.parquet")
                figures = self.figures(stats, start, rows_todo)
                atomic_write_json(self.out / "progress.json", {**figures, "chunks_done": len(done) + todo.index(k) + 1, "chunks": len(chunks)})
                if bar is not None:
                    bar.update(len(chunks[k]))
                    bar.set_postfix(rows_s=f"{figures['rows_per_s']:.1f}", tok_s=f"{figures['tokens_per_s']:.0f}", fail=f"{figures['failure_rate']:.1%}")
        if bar is not None:
            bar.close()
        return self.finish(recorder, fp, history, records, stats, start, rows_todo, engine)

    def figures(self, stats: dict, start: float, rows_todo: int) -> dict[str, Any]:
        elapsed = max(time.time() - start, 1e-9)
        rows = stats["rows_done"] + stats["rows_failed"]
        rate = rows / elapsed
        return {
            **stats,
            "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(rate, 3),
            "tokens_per_s": round(stats["completion_tokens"] / elapsed, 1),
            "failure_rate": round(stats["rows_failed"] / rows, 4) if rows else 0.0,
            "eta_s": round((rows_todo - rows) / rate, 1) if rate > 0 else None,
        }

    def finish(self, recorder, fp, history, records, stats, start, rows_todo, engine) -> dict[str, Any]:
        import pyarrow.parquet as pq

        shard_files = sorted((self.out / "shards").glob("part-*.parquet")) if (self.out / "shards").is_dir() else []
        n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_files)
        failed = [json.loads(line) for line in (self.out / "failed.jsonl").read_text().splitlines() if line.strip()]
        for f in failed:
            recorder.rejects[f["reason"]] += 1
        recorder.add_output("generations", self.out / "shards", rows=n_rows, files=len(shard_files))
        recorder.add_output("failed", self.out / "failed.jsonl", rows=len(failed))
        recorder.extra.update(
            {
                "fingerprint": fp,
                "fingerprint_history": history,
                "model_used": self.model,
                "engine": {"kind": self.cfg.engine.kind, "version": getattr(engine, "version", engine_version(self.cfg.engine.kind))},
                "progress": self.figures(stats, start, rows_todo),
                "input_rows": len(records),
                "complete": n_rows + len(failed) == len(records),
            }
        )
        return recorder.finish()

    # ---------------------------------------------------------------- one chunk
    def run_chunk(self, engine, chunk: list[tuple[str, dict]], k: int, stats: dict) -> tuple[list[dict], list[dict]]:
        from recforge.config import RecforgeError as RenderError

        entity = {rid: str(rec.get("entity_type") or "item") for rid, rec in chunk}
        prompts: dict[str, str] = {}
        last_error: dict[str, tuple[str, str]] = {}
        for rid, rec in chunk:
            try:
                prompts[rid] = engine.render_chat(self.template.messages(rec, rid, self.variables))
            except RenderError as err:
                last_error[rid] = ("render_error", str(err))
        pending = [rid for rid, _ in chunk if rid in prompts]
        done: dict[str, dict] = {}
        attempts: dict[str, int] = {}
        s = self.sampling
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            temperature = s["temperature"] if attempt == 0 or s["temperature"] > 0 else self.cfg.retry_temperature
            reqs = []
            for rid in pending:
                sampling = Sampling(
                    max_tokens=s["max_tokens"], temperature=temperature, top_p=s["top_p"], n=s["n"],
                    seed=row_seed(self.cfg.seed, self.shard, rid, attempt), stop=tuple(s["stop"] or ()),
                )
                reqs.append(GenerationRequest(rid, prompts[rid], sampling, self.constraint))
            results = engine.generate(reqs)
            retry = []
            for req, res in zip(reqs, results):
                attempts[req.request_id] = attempt + 1
                row = self.accept(req, res, entity[req.request_id], attempt + 1, last_error, stats)
                if row is not None:
                    done[req.request_id] = row
                elif not last_error[req.request_id][0].startswith(NO_RETRY):
                    retry.append(req.request_id)
            pending = retry
        rows, failures = [], []
        for rid, _ in chunk:
            if rid in done:
                rows.append(done[rid])
                stats["rows_done"] += 1
            else:
                reason, detail = last_error[rid]
                failures.append({"id": rid, "chunk": k, "reason": reason, "detail": detail, "attempts": attempts.get(rid, 0)})
                stats["rows_failed"] += 1
        return rows, failures

    def accept(self, req, res, entity_type, attempts, last_error, stats) -> dict | None:
        """The output row if at least one completion is valid, else None (the reason goes to last_error)."""
        stats["prompt_tokens"] += res.prompt_tokens
        if not res.ok:
            reason = "prompt_too_long" if res.error.startswith("prompt_too_long") else "engine_error"
            last_error[req.request_id] = (reason, res.error)
            return None
        stats["completion_tokens"] += sum(c.num_tokens for c in res.completions)
        valid = []
        for c in res.completions:
            try:
                valid.append((c, parse_output(c.text, self.output_spec)))
            except ParseError as err:
                reason = "truncated" if c.finish_reason == "length" else err.reason
                last_error[req.request_id] = (reason, f"{err.detail} (finish_reason={c.finish_reason})")
        if not valid:
            return None
        first, value = valid[0]
        return {
            "id": req.request_id,
            "entity_type": entity_type,
            "task": self.template.name,
            "output": json.dumps(value, ensure_ascii=False),
            "outputs": [json.dumps(v, ensure_ascii=False) for _, v in valid],
            "raw": first.text,
            "finish_reason": first.finish_reason,
            "attempts": attempts,
            "seed": req.sampling.seed,
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": sum(c.num_tokens for c in res.completions),
        }


def run_generate(cfg: GenerateConfig, shard: str | None = None, force: bool = False, progress: bool = True,
                 overwrite: bool = False) -> dict[str, Any]:
    run = GenerationRun(cfg, ShardSpec.parse(shard), force=force, progress=progress)
    if overwrite:
        run.discard_outputs()
    return run.run()


def read_generations(run_dir: str | Path):
    """All output rows of a run (every shard folder under it too) as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(run_dir).glob("shards/part-*.parquet")) + sorted(Path(run_dir).glob("shard-*/shards/part-*.parquet"))
    if not files:
        raise RecforgeError(f"{run_dir}: no generation shards (shards/part-*.parquet) found")
    return pa.concat_tables([pq.read_table(f, schema=output_schema()) for f in files])
