"""Every shipped recipe loads with the config class its command uses, and what it references resolves.

One test per recipe file, so a broken recipe names itself. For each one:
- it validates with the class of its command (`load_recipe(...)` in the stage CLIs);
- every `sample://` file it names (its own keys and the defaults it keeps) is shipped;
- every column its input mappings name (`id`, `fields`, a generate input's history columns, a catalogue's
  `text_fields`) is a key of that file's rows;
- its templates name only fields the records provide: generate's prompt spec loads and renders the first input
  records through the runner's own reader; the CTR / export-features `{field}` templates and data recipes'
  serializer / field-target fields are fields of the mapped items (a misspelt field would render empty, silently).

Paths outside the repo (`../shared/data/...`, MovieLens: never committed, its licence forbids redistribution) are
checked when present; absent ones are skipped by field, with the reason. Paths under `runs/` are the outputs of
other steps (a model, a corpus, a generate run) and hub ids (`Qwen/...`) are downloads: neither is checked here.
"""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import pytest
from pydantic import BaseModel

from recforge.align.align_config import AlignConfig, CatalogueSource, EmbedConfig, PseudoFilterConfig, RetrievalEvalConfig
from recforge.align.ctr.config import CTRRecipe, ExportFeaturesRecipe
from recforge.config import load_recipe, read_recipe_file
from recforge.data_recipes.recipe_config import DataRecipe
from recforge.finetune.cpt_config import CPTConfig
from recforge.finetune.sft_config import SFTConfig
from recforge.generate.generate_config import GenerateConfig, HistoryConfig, InputConfig
from recforge.io import resolve_path
from recforge.readers import SourceConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "site", "runs", ".git", "node_modules"}
EXTERNAL = "../shared/data/"

# align/recipes: the command of each recipe that is neither `eval ctr` (ctr_*), `embed` (embed_*) nor
# `export-features` (features_*). A new recipe must be added here (the test fails naming it).
ALIGN_COMMANDS = {
    "esci_minilm.yaml": AlignConfig, "esci_minilm_pseudo.yaml": AlignConfig, "esci_smollm2.yaml": AlignConfig,
    "esci_tiny_lm.yaml": AlignConfig, "goodbooks_larr.yaml": AlignConfig, "goodbooks_notellm.yaml": AlignConfig,
    "i2i_ml100k.yaml": AlignConfig,
    "eval_esci.yaml": RetrievalEvalConfig, "esci_pseudo_eval.yaml": RetrievalEvalConfig,
    "esci_pseudo_filter.yaml": PseudoFilterConfig,
}


def shipped_recipes() -> list[Path]:
    """Every YAML file in a `recipes` folder of the repo (stage folders and any other)."""
    found = []
    for path in REPO_ROOT.rglob("*.yaml"):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in SKIP_DIRS or "recipes" not in rel.parts[:-1]:
            continue
        found.append(rel)
    return sorted(found)


def config_class(rel: Path) -> type[BaseModel]:
    """The class the command that runs this recipe loads it with (see `load_recipe(` in the stage CLIs)."""
    stage, name = rel.parts[0], rel.name
    if stage == "data_recipes":
        return DataRecipe  # recforge data
    if stage == "finetune":
        return SFTConfig if name.startswith("sft_") else CPTConfig  # recforge sft / recforge cpt
    if stage == "generate":
        return GenerateConfig  # recforge generate
    if stage == "align":
        if name.startswith("ctr_"):
            return CTRRecipe  # recforge eval ctr / train-ctr
        if name.startswith("embed_"):
            return EmbedConfig  # recforge embed
        if name.startswith("features_"):
            return ExportFeaturesRecipe  # recforge export-features
        if name in ALIGN_COMMANDS:
            return ALIGN_COMMANDS[name]
    raise AssertionError(f"{rel}: no command known for this recipe; add it to tests/test_shipped_recipes.py")


RECIPES = shipped_recipes()


def test_the_shipped_recipes_are_found():
    stages = {r.parts[0] for r in RECIPES}
    assert {"data_recipes", "finetune", "generate", "align"} <= stages and len(RECIPES) >= 40


# ------------------------------------------------------------------------------------------------ helpers


def leaves(data, prefix: str = ""):
    """(dotted key, value) of every scalar of a dumped config."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], data


def models(obj, prefix: str = ""):
    """(dotted key, sub-config) of every pydantic model inside a config, the config itself first."""
    if isinstance(obj, BaseModel):
        yield prefix[:-1], obj
        for name in type(obj).model_fields:
            yield from models(getattr(obj, name), f"{prefix}{name}.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from models(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from models(v, f"{prefix}{i}.")


def template_fields(template: str | None) -> set[str]:
    """The field names a `str.format` template reads (`{rating:.0f}` -> rating)."""
    if not template:
        return set()
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template) if field}


class Refs:
    """The paths a recipe names: shipped samples must exist; external data is checked when present, else noted."""

    def __init__(self, rel: Path):
        self.rel = rel
        self.absent: dict[str, str] = {}  # external path not on this machine -> the first key naming it

    def local(self, key: str, path: str) -> Path | None:
        """The file behind `path` (relative paths from the repo root, as the commands run), or None when it is
        external data absent here (noted for the skip)."""
        p = resolve_path(path)
        p = p if p.is_absolute() else REPO_ROOT / p
        if path.startswith(EXTERNAL) and not p.exists():
            self.absent.setdefault(path, key)
            return None
        assert p.exists(), f"{self.rel}: {key}: {path} does not exist ({p})"
        return p


def row_keys(path: Path, rows: int = 50) -> set[str]:
    """The keys of the first rows of a JSONL (.gz) file: the columns a mapping may name."""
    assert path.name.endswith((".jsonl", ".jsonl.gz")), f"{path}: only JSONL inputs are checked; extend row_keys"
    keys: set[str] = set()
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        for _, line in zip(range(rows), f):
            keys |= set(json.loads(line))
    return keys


def check_columns(refs: Refs, key: str, path: str, columns: list[str | None]) -> set[str] | None:
    """Every named column is in the file; returns the file's columns (None: external data absent)."""
    p = refs.local(key, path)
    if p is None:
        return None
    have = row_keys(p)
    missing = sorted(c for c in columns if c and c not in have)
    assert not missing, f"{refs.rel}: {key}: column(s) {missing} not in {path} (it has {sorted(have)})"
    return have


def mapped_fields(src: SourceConfig, have: set[str]) -> set[str]:
    """The record fields a source yields: its `fields` keys, or every column but the id when none are mapped."""
    return set(src.fields) if src.fields else have - {src.id}


def assert_fields(rel: Path, key: str, used: set[str], available: set[str]) -> None:
    unknown = sorted(used - available)
    assert not unknown, f"{rel}: {key} names field(s) {unknown} the records do not have ({sorted(available)})"


# ------------------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("rel", RECIPES, ids=[str(r) for r in RECIPES])
def test_shipped_recipe_loads_and_its_references_resolve(rel, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # relative paths (../shared/data, runs/) are read from the repo root
    cfg = load_recipe(config_class(rel), REPO_ROOT / rel)
    refs = Refs(rel)

    samples = [(k, v) for k, v in leaves(cfg.model_dump(mode="json")) if isinstance(v, str) and v.startswith("sample://")]
    for key, value in samples:
        assert resolve_path(value).is_file(), f"{rel}: {key}: {value} is not a shipped sample"
    # external data the recipe itself names (a default such as AlignConfig's data.movielens.path is only read by
    # the recipes that set data.source to it, and those name it)
    for key, value in leaves(read_recipe_file(REPO_ROOT / rel)):
        if isinstance(value, str) and value.startswith(EXTERNAL):
            refs.local(key, value)

    # the column mappings of every input
    sources: dict[str, set[str] | None] = {}
    for key, sub in models(cfg):
        if isinstance(sub, SourceConfig):
            sources[key] = check_columns(refs, f"{key}.fields", sub.path, [sub.id, *sub.fields.values()])
        elif isinstance(sub, InputConfig):
            sources[key] = check_columns(refs, key, sub.path, [sub.id, *sub.fields.values()]
                                         + ([sub.history.ids_column, sub.history.ratings_column] if sub.history else []))
        elif isinstance(sub, HistoryConfig):
            check_columns(refs, key, sub.items_path, [sub.item_id, sub.title_field])
        elif isinstance(sub, CatalogueSource):
            check_columns(refs, key, sub.path, [sub.id, *sub.text_fields])

    if isinstance(cfg, GenerateConfig):
        check_generate_prompt(cfg, refs, tmp_path)
    elif isinstance(cfg, CTRRecipe):
        check_ctr_templates(cfg, refs, sources)
    elif isinstance(cfg, ExportFeaturesRecipe) and sources["source"] is not None:
        assert_fields(rel, "text_template", template_fields(cfg.text_template), mapped_fields(cfg.source, sources["source"]))
    elif isinstance(cfg, DataRecipe) and cfg.inputs.items is not None:
        check_data_recipe_fields(cfg, rel, mapped_fields(cfg.inputs.items, sources["inputs.items"]))

    if refs.absent:
        pytest.skip(f"{rel}: external data absent here, not checked: "
                    + ", ".join(f"{k}={v}" for v, k in refs.absent.items()) + " (everything else was checked)")


def check_generate_prompt(cfg: GenerateConfig, refs: Refs, tmp_path: Path) -> None:
    """The prompt spec and template load, and render the first input records (the runner's own reader)."""
    from recforge.generate.inputs import read_records, resolve_taxonomy
    from recforge.prompts import load_prompt

    template = load_prompt(cfg.task)
    variables = dict(cfg.prompt_vars)
    taxonomy = resolve_taxonomy(cfg)
    if taxonomy is not None:
        assert taxonomy, f"{refs.rel}: taxonomy resolves to no tag"
        variables["taxonomy"] = taxonomy
    template.output_for(variables)
    if any(k.startswith("input.") for k in refs.absent.values()):
        return  # external data absent (noted)
    records = read_records(cfg.model_copy(update={"input": cfg.input.model_copy(update={"limit": 3})}), tmp_path / "rejects.jsonl")
    assert records, f"{refs.rel}: input {cfg.input.path} yields no record"
    for rid, record in records:
        turns = template.messages(record, rid, variables)
        assert turns[-1]["role"] == "user" and turns[-1]["content"].strip(), (refs.rel, rid)


def check_ctr_templates(cfg: CTRRecipe, refs: Refs, sources: dict) -> None:
    """The `{field}` templates the recipe's mode reads name fields its items / users provide."""
    items, users = sources.get("inputs.items"), sources.get("inputs.users")
    if items is None:
        return  # external data absent (noted)
    item_fields = mapped_fields(cfg.inputs.items, items)
    user_fields = mapped_fields(cfg.inputs.users, users) if cfg.inputs.users is not None and users is not None else set()
    rel = refs.rel
    if cfg.mode == "text":
        assert_fields(rel, "text.item_template", template_fields(cfg.text.item_template), item_fields)
        assert_fields(rel, "text.history_item_template", template_fields(cfg.text.history_item_template), item_fields | {"rating"})
        assert_fields(rel, "text.user_template", template_fields(cfg.text.user_template), {"profile", "history"})
        if cfg.text.profile_template and users is not None:
            assert cfg.inputs.users is not None, f"{rel}: text.profile_template without inputs.users"
            assert_fields(rel, "text.profile_template", template_fields(cfg.text.profile_template), user_fields)
    elif cfg.mode == "bahe":
        assert_fields(rel, "model.llm.behaviour_template", template_fields(cfg.model.llm.behaviour_template), item_fields)
    else:
        larr = cfg.model.larr
        assert_fields(rel, "model.larr.item_template", template_fields(larr.item_template), item_fields)
        assert_fields(rel, "model.larr.time_template", template_fields(larr.time_template), {"hour", "weekday"})
        if larr.profile_template and users is not None:
            assert cfg.inputs.users is not None, f"{rel}: model.larr.profile_template without inputs.users"
            assert_fields(rel, "model.larr.profile_template", template_fields(larr.profile_template),
                          user_fields | {"zip_prefix"} if "zip_code" in user_fields else user_fields)


def check_data_recipe_fields(cfg: DataRecipe, rel: Path, item_fields: set[str]) -> None:
    assert_fields(rel, "serializer.fields", set(cfg.serializer.fields or []), item_fields)
    assert_fields(rel, "serializer.keep_fields", set(cfg.serializer.keep_fields), item_fields)
    if cfg.field_targets.enabled:
        for i, task in enumerate(cfg.field_targets.tasks):
            assert_fields(rel, f"field_targets.tasks.{i}", set(task.source) | set(task.target), item_fields)
    if cfg.pairs.user_item.enabled and cfg.pairs.user_item.history_field:
        assert_fields(rel, "pairs.user_item.history_field", {cfg.pairs.user_item.history_field}, item_fields)
