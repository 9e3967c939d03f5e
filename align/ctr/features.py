"""Versioned feature tables for ranking teams: `id -> vector` in Parquet plus a JSON contract.

A table is a folder:

    vectors.parquet   columns <id_column> (string), vector (fixed-size list of float32)
    contract.json     embedding model and revision, dimension, dtype, normalisation, creation time,
                      source data hashes, recforge version, row count, and a version string

`load_feature_table` checks the contract against what a job expects and fails with a clear message
on any mismatch (dimension, model, normalisation), on a vector of the wrong length, and on NaN/inf,
naming the table and the offending ids. A ranking job should never silently read vectors from a
different model.

A text -> vector cache (`cached_text_vectors`: BAHE's behaviours, LARR's scene texts) also records in
contract.json, under "run_contract", what its vectors were made from in the project's one resume format
(`recforge.run_contract`: job, inputs, model, settings), and is reused only where `run_contract.check` finds
nothing changed: the model by content (its folder digest, so a copied folder still matches and a retrained one
of the same size does not), the embedding settings (dimension, entity, normalisation, text normalisation) and
the caller's (layers, pooling, token cap...). No inputs: the texts are the cache's keys, so a new or edited
text is encoded and added, never answered with another text's vector.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recforge import __version__, run_contract
from recforge.config import RecforgeError
from recforge.io import atomic_write_json, resolve_path, write_parquet_atomic

CONTRACT_FILE = "contract.json"
VECTORS_FILE = "vectors.parquet"
# the contract.json fields `write_feature_table` writes itself; the rest are the caller's `extra`
TABLE_FIELDS = ("name", "version", "entity", "id_column", "rows", "model", "dimension", "dtype", "normalized",
                "created_at", "source_hashes", "content_sha256", "recforge_version", "run_contract")


class FeatureContractError(RecforgeError):
    """A feature table does not match what the job expects, or holds bad vectors."""


def model_revision(name_or_path: str) -> str:
    """A revision for the embedding model: the project's one content digest of its folder
    (`recforge.fingerprint.folder_digest`: every weights shard, config and tokenizer file), else the name as given.

    Two runs agree on the revision exactly when they used the same model files; a second weights shard or a
    changed tokenizer is a different model (the first shard alone was not enough to tell).
    """
    from recforge.fingerprint import folder_digest

    path = resolve_path(name_or_path)
    if path.is_dir():
        return "folder-sha256:" + folder_digest(path)
    return f"name:{name_or_path}"


@dataclass(frozen=True)
class FeatureExpectation:
    """What a consuming job requires of a table; None means 'any'."""

    dimension: int | None = None
    model: str | None = None  # name_or_path as recorded in the contract
    model_revision: str | None = None
    normalized: bool | None = None
    entity: str | None = None
    # further contract keys that must match exactly (e.g. a cache's lower_layers or pooling)
    extra: tuple[tuple[str, Any], ...] = ()


def write_feature_table(
    out_dir: str | Path,
    *,
    name: str,
    entity: str,
    ids: list[str],
    vectors: np.ndarray,
    model: str,
    normalized: bool,
    source_hashes: dict[str, str],
    extra: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `vectors.parquet` and `contract.json` atomically; returns the contract. `run`: the table's
    `recforge.run_contract` contract (a cache's), recorded under "run_contract"."""
    import pyarrow as pa

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != vectors.shape[0]:
        raise FeatureContractError(f"{name}: {len(ids)} ids for a vector block of shape {vectors.shape}")
    _check_finite(name, ids, vectors)
    if len(set(ids)) != len(ids):
        raise FeatureContractError(f"{name}: duplicate ids in the table")
    dim = int(vectors.shape[1])
    id_column = f"{entity}_id"
    table = pa.table({
        id_column: pa.array(ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
    })
    out = Path(out_dir)
    write_parquet_atomic(table, out / VECTORS_FILE)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    content_hash = hashlib.sha256(vectors.tobytes() + "\n".join(ids).encode()).hexdigest()
    contract = {
        "name": name,
        "version": f"{name}@{created[:10]}-{content_hash[:12]}",
        "entity": entity,
        "id_column": id_column,
        "rows": len(ids),
        "model": {"name_or_path": model, "revision": model_revision(model)},
        "dimension": dim,
        "dtype": "float32",
        "normalized": bool(normalized),
        "created_at": created,
        "source_hashes": dict(sorted(source_hashes.items())),
        "content_sha256": content_hash,
        "recforge_version": __version__,
        **(extra or {}),
        **({"run_contract": run} if run is not None else {}),
    }
    atomic_write_json(out / CONTRACT_FILE, contract)
    return contract


def _check_finite(name: str, ids: list[str], vectors: np.ndarray) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        where = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise FeatureContractError(f"{name}: {int(bad.sum())} vector(s) hold NaN or inf, e.g. id {', '.join(where)}")


def read_contract(table_dir: str | Path) -> dict[str, Any]:
    path = Path(table_dir) / CONTRACT_FILE
    if not path.is_file():
        raise FeatureContractError(f"{table_dir}: no {CONTRACT_FILE}: not a recforge feature table")
    return json.loads(path.read_text(encoding="utf-8"))


def check_contract(contract: dict[str, Any], expect: FeatureExpectation, table: str) -> None:
    problems = []
    if expect.dimension is not None and contract["dimension"] != expect.dimension:
        problems.append(f"dimension {contract['dimension']} != expected {expect.dimension}")
    if expect.model is not None and contract["model"]["name_or_path"] != expect.model:
        problems.append(f"model {contract['model']['name_or_path']!r} != expected {expect.model!r}")
    if expect.model_revision is not None and contract["model"]["revision"] != expect.model_revision:
        problems.append(f"model revision {contract['model']['revision']} != expected {expect.model_revision}")
    if expect.normalized is not None and contract["normalized"] != expect.normalized:
        problems.append(f"normalized={contract['normalized']} but the job expects normalized={expect.normalized}")
    if expect.entity is not None and contract["entity"] != expect.entity:
        problems.append(f"entity {contract['entity']!r} != expected {expect.entity!r}")
    for key, value in expect.extra:
        if contract.get(key) != value:
            problems.append(f"{key} {contract.get(key)!r} != expected {value!r}")
    if problems:
        raise FeatureContractError(f"feature table {table} ({contract.get('version')}) does not match: " + "; ".join(problems))


def load_feature_table(table_dir: str | Path, expect: FeatureExpectation = FeatureExpectation()) -> tuple[list[str], np.ndarray, dict]:
    """Read a table after checking its contract; returns (ids, float32 matrix, contract)."""
    import pyarrow.parquet as pq

    table_dir = Path(table_dir)
    contract = read_contract(table_dir)
    check_contract(contract, expect, str(table_dir))
    table = pq.read_table(table_dir / VECTORS_FILE)
    id_column = contract["id_column"]
    if id_column not in table.column_names or "vector" not in table.column_names:
        raise FeatureContractError(f"{table_dir}: expected columns {id_column!r} and 'vector', found {table.column_names}")
    ids = [str(x) for x in table.column(id_column).to_pylist()]
    rows = table.column("vector").to_pylist()
    dim = contract["dimension"]
    wrong = [ids[i] for i, v in enumerate(rows) if v is None or len(v) != dim]
    if wrong:
        raise FeatureContractError(
            f"{table_dir}: {len(wrong)} vector(s) are not of the contract's dimension {dim}, e.g. id {', '.join(wrong[:5])}"
        )
    vectors = np.asarray(rows, dtype=np.float32).reshape(len(ids), dim)
    _check_finite(str(table_dir), ids, vectors)
    return ids, vectors, contract


@dataclass
class Coverage:
    """How a feature table's ids line up with the ids a job needs (reported, never a crash)."""

    table: str
    needed: int
    found: int
    missing_ids: list[str]  # needed but absent from the table (they get a zero vector and a flag)
    unused: int  # in the table but not needed

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "needed": self.needed, "found": self.found,
                "missing": len(self.missing_ids), "missing_examples": self.missing_ids[:10], "unused": self.unused}


def align_to_ids(table: str, ids: list[str], vectors: np.ndarray, needed: list[str]) -> tuple[np.ndarray, Coverage]:
    """Rows of `vectors` in the order of `needed`; absent ids get zeros. Returns the matrix and its coverage."""
    index = {i: n for n, i in enumerate(ids)}
    out = np.zeros((len(needed), vectors.shape[1]), dtype=np.float32)
    missing = []
    for row, key in enumerate(needed):
        pos = index.get(key)
        if pos is None:
            missing.append(key)
        else:
            out[row] = vectors[pos]
    unused = len(set(ids) - set(needed))
    return out, Coverage(table, len(needed), len(needed) - len(missing), missing, unused)


# ------------------------------------------------------------------------- text -> vector caches (BAHE, LARR)

TEXT_NORMALISATION = "nfkc-whitespace-v1"


def normalise_text(text: str) -> str:
    """NFKC, whitespace collapsed. Case is kept: it carries meaning for an LLM, and the normalised text is
    what gets encoded, so one key always means one vector."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_key(text: str) -> str:
    return hashlib.blake2b(normalise_text(text).encode(), digest_size=16).hexdigest()


def text_vectors_contract(name: str, entity: str, model: str, dimension: int, settings: dict[str, Any]) -> dict:
    """The `recforge.run_contract` contract of a text -> vector cache (see the module doc): job = the table's
    name, no inputs, the model by content (a hub id by name), `settings` plus the table's embedding fields."""
    digest = run_contract.model_digest(model)
    return run_contract.make(name, {}, {"digest": digest} if digest else {"name": model},
                             {**settings, "entity": entity, "dimension": dimension, "normalized": False})


def recorded_run_contract(table: dict[str, Any]) -> dict:
    """A cache's contract.json -> its run contract. A cache written before it recorded one: rebuilt from the
    flat fields (the model from its revision, the caller's fields and the embedding fields as settings)."""
    if "run_contract" in table:
        return table["run_contract"]
    kind, _, value = table["model"]["revision"].partition(":")
    model = {"folder-sha256": {"digest": value}, "name": {"name": value}}.get(kind, {"revision": table["model"]["revision"]})
    settings = {k: v for k, v in table.items() if k not in TABLE_FIELDS}
    settings.update(entity=table["entity"], dimension=table["dimension"], normalized=table["normalized"])
    return {"job": table["name"], "inputs": {}, "model": model, "settings": settings}


def contract_differences(previous: dict, current: dict) -> str:
    """What `run_contract.changed_keys` names, with both values: `lower_layers 2 != expected 1; ...`."""
    def value(contract: dict, key: str) -> Any:
        if key == "job":
            return contract.get("job")
        section, leaf = ("model", key[len("model."):]) if key.startswith("model.") else ("settings", key)
        return (contract.get(section) or {}).get(leaf)

    return "; ".join(f"{k} {value(previous, k)!r} != expected {value(current, k)!r}"
                     for k in run_contract.changed_keys(previous, current))


def cached_text_vectors(
    table_dir: str | Path,
    *,
    name: str,
    entity: str,
    texts: list[str],
    contract: dict[str, Any],
    model: str,
    dimension: int,
    encode: Callable[[list[str]], np.ndarray],
    config_key: str,
) -> tuple[dict[str, int], np.ndarray, dict[str, Any]]:
    """Vectors of distinct normalised texts from a feature table keyed by `text_key`, encoding only what is new.

    `contract` (model fingerprint, layers, pooling, ...) and `model`'s content must match the stored table's
    (`text_vectors_contract`, checked by `recforge.run_contract.check`): a table of another model or setting is
    refused, naming what differs, never mixed or silently rebuilt. `contract`'s fields are also written flat
    into contract.json. Returns ({text key: row}, vectors, what was reused / encoded).
    """
    wanted: dict[str, str] = {}
    for text in texts:
        wanted.setdefault(text_key(text), normalise_text(text))
    contract = {**contract, "text_normalisation": TEXT_NORMALISATION}
    current = text_vectors_contract(name, entity, model, dimension, contract)
    table_dir = Path(table_dir)
    path = table_dir / CONTRACT_FILE
    ids: list[str] = []
    vectors = np.zeros((0, dimension), np.float32)
    try:
        previous = run_contract.load(path, recorded_run_contract)
    except RecforgeError:
        raise FeatureContractError(f"{config_key}: {path} is not a readable feature-table contract; delete {table_dir} "
                                   f"or point {config_key} elsewhere to rebuild") from None
    if previous is not None:
        if run_contract.check(previous, current, path) is not None:
            raise FeatureContractError(f"{config_key}: feature table {table_dir} was made differently: "
                                       f"{contract_differences(previous, current)}; delete it or point {config_key} "
                                       "elsewhere to rebuild")
        ids, vectors, _ = load_feature_table(table_dir)
    have = set(ids)
    missing = [k for k in wanted if k not in have]
    started = time.time()
    if missing:
        new = np.asarray(encode([wanted[k] for k in missing]), dtype=np.float32)
        ids, vectors = ids + missing, np.vstack([vectors, new])
        written = write_feature_table(table_dir, name=name, entity=entity, ids=ids, vectors=vectors, model=model,
                                      normalized=False, source_hashes={}, extra=contract, run=current)
    else:
        written = read_contract(table_dir)
    info = {"table": str(table_dir), "version": written["version"], "distinct_texts": len(wanted),
            "encoded": len(missing), "reused": len(wanted) - len(missing), "encode_seconds": round(time.time() - started, 2)}
    return {k: i for i, k in enumerate(ids)}, vectors, info
