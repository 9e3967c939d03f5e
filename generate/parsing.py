"""Turn a completion into a validated value: JSON extraction robust to code fences and trailing text,
then validation against the prompt's output spec (JSON schema, choice list, regex, or non-empty text)."""

from __future__ import annotations

import json
import re
from typing import Any

FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON object/array in `text`: inside a ```json fence if there is one, ignoring text around it."""
    candidates = [m.group(1) for m in FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for cand in candidates:
        for start, ch in enumerate(cand):
            if ch in "{[":
                try:
                    value, _ = decoder.raw_decode(cand, start)
                    return value
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object or array found")


class ParseError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_output(text: str, output) -> Any:
    """Validated value of one completion, or `ParseError(reason, detail)`. `output` is a prompt OutputSpec."""
    if output.format == "json":
        try:
            value = extract_json(text)
        except ValueError as err:
            raise ParseError("invalid_json", f"{err}: {text[:120]!r}") from None
        import jsonschema

        errors = sorted(jsonschema.Draft202012Validator(output.json_schema).iter_errors(value), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = "/".join(str(p) for p in e.path) or "(root)"
            raise ParseError("schema_violation", f"{where}: {e.message[:160]}")
        return value
    stripped = text.strip()
    if output.format == "choice":
        if stripped not in output.choices:
            raise ParseError("not_a_choice", f"{stripped[:60]!r} is not one of {len(output.choices)} choices")
        return stripped
    if output.format == "regex":
        if not re.fullmatch(output.regex, stripped):
            raise ParseError("regex_mismatch", f"{stripped[:60]!r} does not match {output.regex!r}")
        return stripped
    if not stripped:
        raise ParseError("empty_text", "the completion is empty")
    return stripped
