"""What produced the rows of a resumable job: one recorded format, and the one check a resume must pass.

`recforge generate` (out_dir/fingerprint.json) and `recforge embed` (out_dir/plan.json) write their rows part by
part and resume a killed run at the first part not on disk. Rows made from other input, another model or other
settings must never end up in one output, so each job records when it starts what its rows are made of:

    {"job":      "generate" | "embed",
     "inputs":   {recipe key: {"path": the path as given, "sha256": content digest (None: a folder)}},
     "model":    {"path": ..., "digest": content digest of every weight file (None: a hub id), ...job extras},
     "settings": {everything else the rows depend on (job specific)},
     "history":  [earlier contracts a forced resume went on from (generate's --force)]}

- `make(job, inputs, model, settings)`: the current contract (input digests computed, JSON-normalised).
- `save(path, contract, history)` (atomic) and `load(path, upgrade)` (None where there is none; a job's earlier
  flat format is turned into this one by `upgrade`, built with `from_flat`, so folders written before resume).
- `check(previous, current, path)`: the one line refusing the resume, or None. An input whose content changed
  comes first and is never resumable (part k would no longer hold the same rows); then the model and the
  settings that differ (generate's `--force` accepts those: `force=True`, and `changed_keys` says what to record).

File digests are the project's one file digest (`recforge.fingerprint`, cached by path, mtime and size); a model
folder's is `recforge.fingerprint.folder_digest` (a retrained model of the same sizes has another one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from recforge.config import RecforgeError

SECTIONS = ("job", "inputs", "model", "settings")


def input_digests(paths: dict[str, str | os.PathLike]) -> dict[str, str | None]:
    """{recipe key: content sha256} of each input file (None for a folder or a missing path)."""
    from recforge.fingerprint import files_sha256

    return files_sha256(paths)


def model_digest(path: str | os.PathLike | None) -> str | None:
    """Content digest of a local model folder; None for a hub id (its revision identifies it) or no model."""
    from recforge.fingerprint import folder_digest
    from recforge.io import resolve_path

    p = resolve_path(path) if path else None
    return folder_digest(p) if p is not None and p.is_dir() else None


def make(job: str, inputs: dict[str, str | os.PathLike], model: dict[str, Any], settings: dict[str, Any]) -> dict:
    """The contract of a run starting now: `inputs` {recipe key: path} are digested here. Round-tripped through
    JSON, so it compares equal to the same contract loaded back from disk."""
    digests = input_digests(inputs)
    contract = {"job": job, "inputs": {k: {"path": str(p), "sha256": digests[k]} for k, p in inputs.items()},
                "model": model, "settings": settings}
    return json.loads(json.dumps(contract, default=str))


def from_flat(job: str, flat: dict[str, Any], model_keys: dict[str, str], digests: dict[str, str | None]) -> dict:
    """A contract from a job's flat format of before this module: `model_keys` maps its model keys to the model
    section's ({"model_digest": "digest", ...}); every other key is a setting; `digests` {recipe key: sha256}."""
    return {"job": job, "inputs": {k: {"path": None, "sha256": d} for k, d in digests.items()},
            "model": {new: flat[old] for old, new in model_keys.items() if old in flat},
            "settings": {k: v for k, v in flat.items() if k not in model_keys}}


def save(path: str | os.PathLike, contract: dict, history: Iterable[dict] = ()) -> None:
    from recforge.io import atomic_write_json

    atomic_write_json(path, {**{k: contract[k] for k in SECTIONS}, "history": list(history)})


def load(path: str | os.PathLike, upgrade: Callable[[dict], dict] | None = None) -> dict | None:
    """The contract recorded in `path` (with its "history"), or None where there is none. A file in a job's earlier
    format goes through `upgrade`; one that is not a contract at all is one line (the run that wrote it did not)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict) and not all(k in data for k in SECTIONS) and upgrade is not None:
            data = upgrade(data)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in SECTIONS[1:]):
            raise ValueError("not a run contract")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise RecforgeError(f"{p}: not a readable run contract ({type(err).__name__}); use a new out_dir, "
                            "or --overwrite to start over") from None
    return {**data, "history": data.get("history") or []}


def changed_inputs(previous: dict, current: dict) -> list[str]:
    """Recipe keys of the inputs whose content differs from what the previous run recorded. An input it did not
    record (a run of before digests) is not compared; nor one that is gone now (its reader names it better)."""
    before, now = previous.get("inputs") or {}, current.get("inputs") or {}
    return [k for k in now if k in before and now[k]["sha256"] is not None and before[k]["sha256"] != now[k]["sha256"]]


def changed_keys(previous: dict, current: dict) -> list[str]:
    """What else differs: `job`, `model.<key>`, and the settings' keys (bare), each part sorted."""
    keys = ["job"] if previous.get("job") != current.get("job") else []
    for section, prefix in (("model", "model."), ("settings", "")):
        a, b = previous.get(section) or {}, current.get(section) or {}
        keys += [prefix + k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return keys


def check(previous: dict, current: dict, path: str | os.PathLike, force: bool = False,
          can_force: bool = False) -> str | None:
    """One line saying why rows recorded in `path` under `previous` must not be resumed with `current`, or None.

    A changed input names its recipe key, path and both digests (even with `force`); otherwise the keys that
    differ, unless `force`. `can_force`: the job has --force, and the line offers it."""
    p = Path(path)
    for key in changed_inputs(previous, current):
        old, new = previous["inputs"][key]["sha256"], current["inputs"][key]["sha256"]
        return (f"{key} {current['inputs'][key]['path']}: the {key.split('.')[0]}'s content changed since the run in "
                f"{p.parent} started (sha256 {str(old)[:12]}… → {new[:12]}…); use a new out_dir, or --overwrite to "
                "start over")
    keys = changed_keys(previous, current)
    if not keys or force:
        return None
    offer = ", --overwrite to start over, or --force to resume anyway (both are recorded)" if can_force else \
        ", or --overwrite to start over"
    return f"{p}: an earlier run in this out_dir used a different {p.stem} ({', '.join(keys)}); use a new out_dir{offer}"
