"""Prompt templates: one jinja2 template per task (`<task>.j2`) with a sidecar spec (`<task>.yaml`).

The spec says what a template needs and what it must produce:

    name, version, description
    required_fields: record fields the template reads (a missing one is an error naming the record)
    system: the system prompt (a chat turn before the rendered template)
    output: {format: json|choice|regex|text, schema | choices | regex}
    sampling: default {max_tokens, temperature, top_p, n, stop}
    defaults: template variables a recipe may override (k, factor lists, taxonomy, ...)

Security: templates are rendered in a jinja2 `SandboxedEnvironment` with `StrictUndefined`. Record
values are data: they are inserted as text and never parsed as template source, so a title such as
`{{ 7*7 }}` stays literally `{{ 7*7 }}` (also through the model's chat template, which receives the
rendered text as a message value, not as source). A template is code the recipe's author controls, so it
is bounded too: it cannot include, import or extend other templates, its `range`s together create at most
RANGE_BUDGET numbers per record, and `*` / `**` cannot build a huge string, list or number. Whatever a template
(ours or the model's chat template) raises while rendering a record is a `RecforgeError` for that record
(`recforge generate` files it as a `render_error` row; `recforge prompts render` prints one line).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import BaseLoader, StrictUndefined, TemplateError, TemplateNotFound, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, ValidationError

from recforge.config import RecforgeError, RecipeModel, format_validation_error, load_yaml

PROMPTS_DIR = Path(__file__).resolve().parent
# A prompt lists a few dozen things at most; these bounds only stop a template from running away.
RANGE_BUDGET = 10_000  # numbers all `range()` calls of one render may create together (nested loops too)
MAX_PRODUCT = 100_000  # items (characters) a `*` may build from a string or list
MAX_EXPONENT = 64  # `a ** b`: larger exponents can take minutes and gigabytes


class _NoTemplates(BaseLoader):
    """`include` / `import` / `extends` load nothing: a prompt is one file, and a recipe must not read other files."""

    def get_source(self, environment, template):
        raise TemplateNotFound(template, f"prompt templates cannot include, import or extend other templates ({template!r})")


class _PromptSandbox(SandboxedEnvironment):
    """The sandbox with arithmetic bounded (jinja2 calls `call_binop` for `intercepted_binops` and never folds them)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the template limit of {MAX_EXPONENT}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_PRODUCT:
                    raise SecurityError(f"`*` would build {len(seq) * times} items, over the template limit of {MAX_PRODUCT}")
        return super().call_binop(context, operator, left, right)


class _RangeBudget:
    """`range` for one render: the sandbox bounds one range (MAX_RANGE); this bounds all of them together."""

    def __init__(self, budget: int = RANGE_BUDGET):
        self.left = budget

    def __call__(self, *args):
        numbers = range(*args)
        self.left -= len(numbers)
        if self.left < 0:
            raise SecurityError(f"range(): a template may create at most {RANGE_BUDGET} numbers per record")
        return numbers


class OutputSpec(RecipeModel):
    """What a completion must look like; enforced while decoding and validated afterwards."""

    format: Literal["json", "choice", "regex", "text"] = "json"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    choices: list[str] | None = None
    regex: str | None = None
    # Name of the array-of-strings property a fixed taxonomy turns into an enum (e.g. `tags`).
    taxonomy_field: str | None = None

    model_config = dict(RecipeModel.model_config, populate_by_name=True)


class SamplingSpec(RecipeModel):
    """Default sampling for a task (a recipe may override each key). max_tokens is always explicit."""

    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: list[str] = Field(default_factory=list)


class PromptSpec(RecipeModel):
    name: str
    version: str
    description: str = ""
    required_fields: list[str] = Field(default_factory=list)
    system: str = ""
    output: OutputSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    defaults: dict[str, Any] = Field(default_factory=dict)


@dataclass
class PromptTemplate:
    spec: PromptSpec
    source: str  # the jinja2 template text
    spec_text: str
    path: Path
    _compiled: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def template_hash(self) -> str:
        """sha256 of the template and its spec: part of a generation run's fingerprint."""
        return hashlib.sha256((self.source + "\0" + self.spec_text).encode("utf-8")).hexdigest()

    def compiled(self):
        if self._compiled is None:
            env = _PromptSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, loader=_NoTemplates())
            env.filters["tojson_compact"] = lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
            try:
                self._compiled = env.from_string(self.source)
            except TemplateError as err:
                raise RecforgeError(f"{self.path}: template does not compile: {err}") from None
        return self._compiled

    def render_user(self, record: dict[str, Any], record_id: str | None = None, variables: dict | None = None) -> str:
        """The user turn: the template rendered with the record's fields and the spec defaults."""
        rid = record_id if record_id is not None else record.get("id", "?")
        for name in self.spec.required_fields:
            value = record.get(name)
            if value is None or (isinstance(value, (str, list, dict)) and len(value) == 0):
                raise RecforgeError(f"prompt {self.name!r}: record {rid!r} is missing required field {name!r}")
        # Template variables (spec defaults, then the recipe's prompt_vars) win over record fields: a data row
        # holding `k` or `taxonomy` must not change how many tags are asked for or which. The row's own value
        # stays reachable as `record.k`.
        context = {**record, **self.spec.defaults, **(variables or {}), "record": record, "range": _RangeBudget()}
        template = self.compiled()
        try:
            return template.render(**context).strip()
        except UndefinedError as err:
            raise RecforgeError(f"prompt {self.name!r}: record {rid!r}: undefined field in template: {err.message}") from None
        except Exception as err:  # rendering runs the template's code: whatever it raises belongs to this record
            raise RecforgeError(f"prompt {self.name!r}: record {rid!r}: template error: {_one_line(err)}") from None

    def messages(self, record: dict[str, Any], record_id: str | None = None, variables: dict | None = None) -> list[dict]:
        """System turn (shared instructions first, so prefix caching reuses them) + the rendered user turn."""
        msgs = []
        if self.spec.system:
            msgs.append({"role": "system", "content": self.spec.system.strip()})
        msgs.append({"role": "user", "content": self.render_user(record, record_id, variables)})
        return msgs

    def output_for(self, variables: dict | None = None) -> OutputSpec:
        """The output spec, with a fixed taxonomy (if given) narrowing free-text tags to a choice list."""
        variables = {**self.spec.defaults, **(variables or {})}
        taxonomy = variables.get("taxonomy")
        out = self.spec.output
        if out.format != "json" or not out.json_schema or not out.taxonomy_field:
            return out
        schema = json.loads(json.dumps(out.json_schema))
        prop = schema["properties"][out.taxonomy_field]
        if isinstance(variables.get("k"), int):  # "k tags": the schema allows at most k
            prop["maxItems"] = variables["k"]
            prop["minItems"] = min(prop.get("minItems", 1), variables["k"])
        if taxonomy:
            prop["items"] = {"type": "string", "enum": list(taxonomy)}
        return OutputSpec(format="json", schema=schema, taxonomy_field=out.taxonomy_field)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text the model sees: the model's own chat template with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the model folder's template code (jinja2 sandbox errors, raise_exception, range, ...)
            raise RecforgeError(f"the model's chat template failed: {_one_line(err)}") from None
    # A base model without a chat template: plain "role: content" turns.
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def list_prompts(directory: Path = PROMPTS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.j2") if (directory / f"{p.stem}.yaml").is_file())


def load_prompt(name_or_path: str, directory: Path = PROMPTS_DIR) -> PromptTemplate:
    """A shipped task by name (`interest_tags`) or a user's own `path/to/task.j2` (with `task.yaml` beside it)."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".j2":
        j2, spec_path = candidate, candidate.with_suffix(".yaml")
    else:
        j2, spec_path = directory / f"{name_or_path}.j2", directory / f"{name_or_path}.yaml"
    if not j2.is_file() or not spec_path.is_file():
        known = ", ".join(list_prompts(directory))
        raise RecforgeError(f"prompt {name_or_path!r} not found (need {j2.name} + {spec_path.name}); known: {known}")
    spec_text = spec_path.read_text(encoding="utf-8")
    try:
        data = load_yaml(spec_text, str(spec_path)) or {}  # bounded: size and alias expansion
    except yaml.YAMLError as err:
        raise RecforgeError(f"{spec_path}: not valid YAML: {err}") from None
    try:
        spec = PromptSpec.model_validate(data)
    except ValidationError as err:
        raise RecforgeError(format_validation_error(err, str(spec_path))) from None
    _check_output_spec(spec, spec_path)
    return PromptTemplate(spec=spec, source=j2.read_text(encoding="utf-8"), spec_text=spec_text, path=j2)


def _check_output_spec(spec: PromptSpec, path: Path) -> None:
    out = spec.output
    need = {"json": out.json_schema, "choice": out.choices, "regex": out.regex, "text": True}[out.format]
    if not need:
        key = {"json": "schema", "choice": "choices", "regex": "regex"}[out.format]
        raise RecforgeError(f"{path}: key 'output.{key}' is required for output.format={out.format}")
    if out.format == "json":
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(out.json_schema)
        except jsonschema.SchemaError as err:
            raise RecforgeError(f"{path}: key 'output.schema' is not a valid JSON schema: {err.message}") from None
