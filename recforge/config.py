"""Recipe loading: YAML file + `key.sub=value` overrides -> a validated pydantic config.

Every stage defines its own config models (TRL style: one `*_config.py` per mode) on top of
`RecipeModel`, which forbids unknown keys so a typo fails instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class RecforgeError(Exception):
    """An error in the user's input (recipe, data, paths). The CLI prints it without a traceback."""


# ---------------------------------------------------------------- bounded YAML
# Every YAML file recforge reads (recipes, overrides, prompt specs, taxonomy maps) is small, hand-written
# config. It is bounded before anything looks at it: in size, and in how big its anchors/aliases make it.
# PyYAML shares an aliased node, so `b: [*a, *a, ...]` nine levels deep is a few hundred bytes on disk and
# in the parsed object, but 1e9 strings to anything that walks it (pydantic validation, an error message's
# repr); so the size a document would have written out is counted on the node graph, once per node.
MAX_YAML_BYTES = 16 << 20
MAX_YAML_NODES = 1_000_000  # scalars + collections, aliases counted as often as they are used


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a composed document that expands (aliases counted at every use) past MAX_YAML_NODES, or that
    contains itself. Each node is sized once, so this costs the size of the file, not of its expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a structure that contains itself
    # post-order walk, no recursion: a deep document must not hit Python's recursion limit either
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids = _children(node)
        if not children_done and kids:
            if id(node) in open_nodes:
                raise RecforgeError(f"{source}: the YAML holds a structure that contains itself (an alias "
                                    "inside its own anchor); recforge configs are plain trees")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
            continue
        open_nodes.discard(id(node))
        sizes[id(node)] = 1 + sum(sizes.get(id(k), 0) for k in kids)
        if sizes[id(node)] > MAX_YAML_NODES:
            raise RecforgeError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values through its "
                                "anchors and aliases (&name / *name); write the values out or shorten them")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, bounded: refuses text over MAX_YAML_BYTES and alias expansion bombs (one line, naming `source`)."""
    if len(text) > MAX_YAML_BYTES:
        raise RecforgeError(f"{source}: {len(text):,} characters of YAML, more than the {MAX_YAML_BYTES:,} a "
                            "recforge config may have")
    loader = yaml.SafeLoader(text)  # what yaml.safe_load uses, split in compose / check / construct
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file, bounded in size before it is read (see `load_yaml`); errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecforgeError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise RecforgeError(f"{path}: {size:,} bytes, more than the {MAX_YAML_BYTES:,} a recforge {what} may have")
    try:
        return load_yaml(path.read_text(encoding="utf-8-sig"), str(path))
    except yaml.YAMLError as err:
        raise RecforgeError(f"{path}: not valid YAML: {_one_line(err)}") from None
    except UnicodeDecodeError as err:
        raise RecforgeError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None


def _one_line(err: Exception, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def short_repr(value: Any, limit: int = 80) -> str:
    """A repr that never walks more than a few elements: the repr of a shared-reference structure (or just a
    huge value) must not cost memory and time proportional to its expanded size."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxset, r.maxdict = 3, 4, 4, 4, 4
    r.maxstring = r.maxlong = r.maxother = limit
    return r.repr(value)[:limit]


class RecipeModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment.

    `renamed_keys` ({old: new}) lists keys a later version renamed: an old key fails with one line naming the
    new one (`training.epochs was renamed training.num_train_epochs`), not as a bare "unknown key".
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    renamed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed_keys(cls, data: Any) -> Any:
        if cls.renamed_keys and isinstance(data, dict):
            old = [k for k in data if k in cls.renamed_keys]
            if old:
                renamed = [(k, cls.renamed_keys[k]) for k in old]
                raise PydanticCustomError("renamed_key", "; ".join(f"{k} was renamed {new}" for k, new in renamed),
                                          {"renamed": renamed})
        return data


# Training settings take Hugging Face `TrainingArguments`' names wherever a key means the same thing (CPT, SFT,
# align): the keys these stages spelled otherwise, old -> new. Values carry over unchanged (a float warmup_steps
# below 1 is a ratio of the total steps, as transformers 5 reads it: it deprecated warmup_ratio).
TRAINING_ARGUMENTS_RENAMED = {"epochs": "num_train_epochs", "per_device_batch_size": "per_device_train_batch_size",
                              "batch_size": "per_device_train_batch_size", "warmup_ratio": "warmup_steps",
                              "lr_scheduler": "lr_scheduler_type"}


def _steps_or_ratio(value: float) -> int | float:
    if value >= 1:
        if not float(value).is_integer():
            raise ValueError("a number of steps (an integer >= 1) or a ratio of the total steps in [0, 1)")
        return int(value)
    return value


# transformers 5's warmup_steps: an integer >= 1 = steps, a float in [0, 1) = ratio of the total training steps
WarmupSteps = Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(_steps_or_ratio)]


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
        value = load_yaml(raw, f"override {key.strip()}") if raw != "" else ""
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
        if e["type"] == "renamed_key":  # `training.epochs was renamed training.num_train_epochs`
            prefix = key + "." if e["loc"] else ""
            problems += [f"{prefix}{old} was renamed {prefix}{new}" for old, new in e["ctx"]["renamed"]]
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        given = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {short_repr(given)})"
        problems.append(f"key '{key}': {msg}{shown}".replace("\n", " "))
    return f"{source}: " + "; ".join(problems)


def validate_config(model_cls: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise RecforgeError(format_validation_error(err, source)) from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_yaml_file(path, "recipe file") or {}
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
