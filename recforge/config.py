"""Recipe loading: YAML file + `key.sub=value` overrides -> a validated pydantic config.

Every stage defines its own config models (TRL style: one `*_config.py` per mode) on top of
`RecipeModel`, which forbids unknown keys so a typo fails instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class RecforgeError(Exception):
    """An error in the user's input (recipe, data, paths). The CLI prints it without a traceback."""


class RecipeModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise RecforgeError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecforgeError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: take it as a plain string
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict, creating intermediate dicts as needed."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecforgeError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line (the CLI prints errors as one line): `src: key 'a.b': msg (got ...); key 'c': ...`."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {given!r:.80})"
        problems.append(f"key '{key}': {msg}{shown}".replace("\n", " "))
    return f"{source}: " + "; ".join(problems)


def validate_config(model_cls: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise RecforgeError(format_validation_error(err, source)) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecforgeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecforgeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecforgeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(model_cls: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Load a recipe YAML (or nothing), apply command-line overrides, validate.

    Errors name the recipe file and the dotted key, e.g. `esci.yaml: key 'split.by': ...`.
    """
    data = read_recipe_file(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    source = str(path) if path is not None else "<command line>"
    if overrides:
        source += " (with overrides: " + " ".join(overrides) + ")"
    return validate_config(model_cls, data, source)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (every default spelled out), for `resolved_config.yaml`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
