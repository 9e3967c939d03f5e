"""What a generation run folder holds between runs, and what a resume may do with it.

- The contract (`fingerprint.json`, in the one format of `recforge.run_contract`): inputs (content sha256 of
  `input.path` and `input.history.items_path`), model (path, revision, content digests of model and adapter)
  and settings (task, template hash, output spec, sampling, seed, retries, engine and version, input keys,
  chunking, shard, split rule). `RunFolder.check_contract` refuses to resume rows made differently: a changed
  input always (chunk k would no longer hold the same rows), the model or settings unless --force, which goes
  on and records the earlier contract in "history". It is written only once the checks pass.
- `RunFolder.reconcile` brings the folder back to "every finished id exactly once" after a kill at any point:
  chunk k is done when `shards/part-KKKKK.parquet` exists; failure lines of chunks without a part shard go, and
  one line per id is kept (repairing folders written by two concurrent runs before the lock existed). Retry
  shards (`shards/retry-KKKKK-NNN.parquet`) are written before failed.jsonl is rewritten without their ids; a
  kill in between leaves an id in both, and the shard wins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from recforge import run_contract
from recforge.config import RecforgeError
from recforge.generate.generate_config import GenerateConfig
from recforge.io import atomic_write_text
from recforge.shards import ShardSpec
from recforge.splits import DEFAULT_RULE

CONTRACT = "fingerprint.json"
# fingerprint.json's model keys before `recforge.run_contract` (a flat dict, maybe under "current")
LEGACY_MODEL_KEYS = {"model": "path", "revision": "revision", "model_digest": "digest", "adapter": "adapter",
                     "adapter_digest": "adapter_digest"}


def generation_settings(cfg: GenerateConfig, shard: ShardSpec, template, output_spec, variables: dict,
                        sampling: dict, engine_version: str | None) -> dict[str, Any]:
    """The run contract's settings: everything but the input content and the model that decides the rows."""
    return {
        "task": template.name,
        "template_version": template.spec.version,
        "template_hash": template.template_hash,
        "output": json.loads(output_spec.model_dump_json(by_alias=True)),
        "prompt_vars": variables,
        "sampling": sampling,
        "seed": cfg.seed,
        "max_retries": cfg.max_retries,
        "retry_temperature": cfg.retry_temperature,
        "engine": cfg.engine.kind,
        "engine_version": engine_version,
        "input": cfg.input.model_dump(exclude={"split_entity"}),
        "chunk_size": cfg.chunk_size,
        "shard": f"{shard.index}/{shard.count}",
        **split_identity(cfg),
    }


def split_identity(cfg: GenerateConfig) -> dict[str, Any]:
    """The split rule, where it picks the rows (`input.split`) or the taxonomy's training books. Left out for
    the default rule, so runs fingerprinted before the rule was configurable still resume."""
    t, inp = cfg.taxonomy, cfg.input
    # `book` was the only entity before `input.split_entity` existed: left out for it, so those runs resume
    entity = {"split_entity": inp.entity} if inp.split != "all" and inp.entity != "book" else {}
    uses_rule = inp.split != "all" or bool(t and t.from_book_tags and not t.tags)
    if not uses_rule or cfg.split == DEFAULT_RULE:
        return entity
    return {**entity, "split_rule": cfg.split.model_dump()}


def upgrade_legacy(old: dict) -> dict:
    """fingerprint.json as written before `recforge.run_contract`: {"current": flat, "history": [flat],
    "input_digests": {key: sha256}}, or (older still) the flat dict alone, with no input digests."""
    def flat(fp: dict, digests: dict) -> dict:
        return run_contract.from_flat("generate", fp, LEGACY_MODEL_KEYS, digests)

    current = old.get("current", old)
    return {**flat(current, old.get("input_digests") or {}),
            "history": [flat(h, {}) for h in old.get("history", [])]}


def chunk_index(path: Path) -> int:
    """The chunk of `part-KKKKK.parquet` or `retry-KKKKK-NNN.parquet`."""
    return int(path.stem.split("-")[1])


class RunFolder:
    """The resume state of one run folder (`out_dir`, or its shard folder under `--shard i/N`)."""

    def __init__(self, out: Path):
        self.out, self.shards = out, out / "shards"
        self.failed_path = out / "failed.jsonl"

    def check_contract(self, current: dict, force: bool) -> list[dict]:
        """Refuse to resume into rows made differently (see the module doc); returns the contract history. The
        contract is written only when the checks pass."""
        path = self.out / CONTRACT
        previous = run_contract.load(path, upgrade_legacy)
        history: list[dict] = []
        if previous is not None:
            history = previous["history"]
            problem = run_contract.check(previous, current, path, force=force, can_force=True)
            if problem:
                raise RecforgeError(problem)
            if run_contract.changed_keys(previous, current):  # --force: both are recorded
                history.append({k: previous[k] for k in run_contract.SECTIONS})
        run_contract.save(path, current, history)
        return history

    def discard(self) -> None:
        """--overwrite: remove the rows, failures and contract of a previous run in this folder (only those)."""
        if self.shards.is_dir():
            shutil.rmtree(self.shards)
        for name in ("failed.jsonl", CONTRACT, "progress.json", "rejects.jsonl"):
            (self.out / name).unlink(missing_ok=True)

    def read_failed(self) -> list[dict]:
        rows = []
        for line in self.failed_path.read_text(encoding="utf-8").splitlines() if self.failed_path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the torn last line of an append cut by a kill
        return rows

    def write_failed(self, failures: list[dict]) -> None:
        text = "".join(json.dumps(f, ensure_ascii=False, default=str) + "\n" for f in failures)
        atomic_write_text(self.failed_path, text)

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

    def part_path(self, k: int) -> Path:
        return self.shards / f"part-{k:05d}.parquet"

    def next_retry_path(self, k: int) -> Path:
        seen = [int(p.stem.split("-")[2]) for p in self.shards.glob(f"retry-{k:05d}-*.parquet")]
        return self.shards / f"retry-{k:05d}-{max(seen, default=0) + 1:03d}.parquet"


def retry_picks(failures: list[dict], by_id: dict[str, dict], retry_failed: bool) -> list[tuple[dict, dict]]:
    """(failure line, record) of the failed rows to run again, in chunk order.

    Engine errors are transient (OOM, a lost worker), so every resume retries them; the other reasons are
    deterministic for the same contract and are retried only with --retry-failed.
    """
    picks = [f for f in failures if (retry_failed or f["reason"] == "engine_error") and f["id"] in by_id]
    return [(f, by_id[f["id"]]) for f in sorted(picks, key=lambda f: f["chunk"])]
