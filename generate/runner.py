"""`recforge generate`: records -> prompts -> engine -> parse -> validate -> retry -> Parquet shards (the run loop).

Layout of `out_dir` (or `out_dir/shard-IIIII-of-NNNNN` with `--shard i/N`):
    fingerprint.json          the run contract: what produced the rows (`recforge.generate.resume`)
    shards/part-KKKKK.parquet the rows of chunk k (`chunk_size` input rows) that succeeded when the chunk ran
    shards/retry-KKKKK-NNN.parquet  rows of chunk k that failed before and succeeded in its NNN-th retry
    failed.jsonl              rows that failed every attempt so far: id, chunk, reason, detail, attempts
    rejects.jsonl             this run's malformed input rows (never silently dropped; rewritten by every run)
    progress.json             rows/s, tokens/s, failure rate, ETA (updated after each shard; `recforge.generate.progress`)
    resolved_config.yaml, manifest.json   written once the resume checks pass (manifest: `running`, then `complete`)
    .recforge.lock            held for the whole run: a second run on the same folder exits 2 naming this one

The other jobs of a run, each in its own module: the input rows and KAR histories (`recforge.generate.inputs`),
the model and engine (`recforge.generate.engine_factory`), the contract check and the reconciling of a killed run
(`recforge.generate.resume`), the figures (`recforge.generate.progress`).

Invariant: every input id is exactly once in a shard or in failed.jsonl, whenever the run is killed.
- Chunk k always holds the same input rows (input order, after split/shard/limit). It is done when its part
  shard exists; its failure lines are appended just before the shard is renamed into place (all writes
  atomic), and on restart `reconcile` drops failure lines of chunks without a part shard.
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
from pathlib import Path
from typing import Any

from recforge import run_contract
from recforge.generate.engine import GenerationRequest, Sampling, constraint_from_output
from recforge.generate.engine_factory import build_engine, engine_version, model_section, resolve_generation_model
from recforge.generate.generate_config import GenerateConfig
from recforge.generate.inputs import count_lines, input_paths, read_records, resolve_taxonomy, unfinished_inputs
from recforge.generate.parsing import ParseError, parse_output
from recforge.generate.progress import RunProgress
from recforge.generate.resume import RunFolder, generation_settings, retry_picks
from recforge.shards import ShardSpec
from recforge.splits import stable_hash
from recforge.io import write_parquet_atomic
# The shard layout is read back by other stages too, so it lives in the core (imported here for generate's callers).
from recforge.generations import output_schema, read_generations, shard_files  # noqa: F401

NO_RETRY = ("prompt_too_long", "render_error")  # deterministic: another attempt gives the same
# No completion was ever produced for these reasons, so a later retry starts again at attempt 0.
NO_COMPLETION = ("engine_error", *NO_RETRY)


def row_seed(base: int, shard: ShardSpec, record_id: str, attempt: int) -> int:
    """Per-row seed: the run seed, the shard's offset, the id, the attempt (a retry draws new randomness)."""
    return (base + shard.index * 1_000_003 + stable_hash(record_id) % 1_000_000_007 + attempt * 7_919) % (2**31 - 1)


def effective_sampling(cfg: GenerateConfig, spec) -> dict[str, Any]:
    s = spec.sampling.model_dump()
    for k, v in cfg.sampling.model_dump().items():
        if v is not None:
            s[k] = v
    return s


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

        self.cfg, self.shard, self.force = cfg, shard, force
        self.retry_failed, self.engine = retry_failed, engine
        base = Path(cfg.out_dir)
        self.out = base / shard.folder if shard.active else base
        self.folder = RunFolder(self.out)
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
        self.partial = (self.model["partial"] or []) + unfinished_inputs(cfg, allow_partial)
        self.progress = RunProgress(self.out / "progress.json", progress, f"generate {self.template.name}")
        self.done: set[int] = set()
        self.n_chunks, self.n_rejects = 0, 0
        self.streak = 0  # rows in a row (in processing order) that ended with an engine error
        self.stopped: str | None = None  # the last engine error, once the streak has stopped the run

    def contract(self) -> dict[str, Any]:
        """What the rows are made of (`recforge.run_contract`): input content, model, settings."""
        settings = generation_settings(self.cfg, self.shard, self.template, self.output_spec, self.variables,
                                       self.sampling, engine_version(self.cfg.engine.kind))
        return run_contract.make("generate", input_paths(self.cfg), model_section(self.model), settings)

    def discard_outputs(self) -> None:
        """--overwrite: remove the rows, failures and contract of a previous run in this folder (only those)."""
        self.folder.discard()

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

        cfg = self.cfg
        contract = self.contract()
        history = self.folder.check_contract(contract, self.force)
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
        self.done, failures = self.folder.reconcile()
        todo = [k for k in range(len(chunks)) if k not in self.done]
        picks = retry_picks(failures, dict(records), self.retry_failed)
        if self.model["note"]:
            print(f"recforge generate: {self.model['note']}", file=sys.stderr)
        self.n_chunks = len(chunks)
        rows_todo = len(picks) + sum(len(chunks[k]) for k in todo)
        engine = (self.engine or build_engine(cfg, self.model)) if rows_todo else None
        self.progress.begin(rows_todo)
        self.retry_rows(engine, picks, failures)
        if not self.stopped:
            # Opened after the retries: they replace failed.jsonl, and an open handle would append to the old file.
            with JsonlAppender(self.folder.failed_path) as failed_log:
                self.run_chunks(engine, chunks, todo, failed_log)
        self.progress.close()
        return self.finish(recorder, contract, history, records, engine)

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
        self.write_shard([ok[rid] for rid, _ in chunk if rid in ok], self.folder.part_path(k))
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
                self.write_shard([ok[rid] for rid, _ in rows if rid in ok and chunk_of[rid] == k], self.folder.next_retry_path(k))
            failures[:] = [{**f, **again.get(f["id"], {})} for f in failures if f["id"] not in ok]
            self.folder.write_failed(failures)
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
        self.progress.count(n_ok, n_failed, len(self.done), self.n_chunks)

    def stop_message(self) -> str | None:
        if self.stopped is None:
            return None
        last = " ".join(self.stopped.split())[:200]  # one line, whatever the engine printed
        return (f"stopped early: {self.streak} rows in a row failed with an engine error "
                f"(max_consecutive_engine_errors={self.cfg.max_consecutive_engine_errors}; last: {last}); "
                f"{self.n_chunks - len(self.done)} of {self.n_chunks} chunks are not done and engine-error rows are "
                f"retried: fix the engine and rerun the same command to resume {self.out}")

    def finish(self, recorder, contract, history, records, engine) -> dict[str, Any]:
        import pyarrow.parquet as pq

        files = shard_files(self.out)
        n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        failed = self.folder.read_failed()
        for f in failed:
            recorder.rejects[f["reason"]] += 1
        recorder.add_output("generations", self.folder.shards, rows=n_rows, files=len(files))
        recorder.add_output("failed", self.folder.failed_path, rows=len(failed))
        recorder.add_output("rejects", self.out / "rejects.jsonl", rows=self.n_rejects)  # this run's malformed input rows
        recorder.extra.update(
            {
                "fingerprint": contract,
                "fingerprint_history": history,
                "model_used": self.model,
                **({"partial_inputs": self.partial} if self.partial else {}),
                "engine": {"kind": self.cfg.engine.kind, "version": getattr(engine, "version", engine_version(self.cfg.engine.kind))},
                "progress": self.progress.figures(),
                "input_rows": len(records),
                "complete": n_rows + len(failed) == len(records),
                "failures": {"rows": len(failed), "rate": len(failed) / len(records) if records else 0.0,
                             "max_failure_rate": self.cfg.max_failure_rate, "path": str(self.folder.failed_path)},
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
        stats = self.progress.stats
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


def run_problem(manifest: dict[str, Any]) -> str | None:
    """One line saying why a finished `recforge generate` must exit non-zero, or None."""
    if manifest.get("stopped"):
        return manifest["stopped"]
    f = manifest["failures"]
    if f["rate"] > f["max_failure_rate"]:
        return (f"failure rate {f['rate']:.1%} ({f['rows']} of {manifest['input_rows']} rows) is over "
                f"max_failure_rate={f['max_failure_rate']}; the failed rows and their reasons are in {f['path']}")
    return None
