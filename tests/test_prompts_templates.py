"""Prompt templates: every shipped task renders, specs are valid, missing fields and template injection fail safely."""

from __future__ import annotations

import json

import jsonschema
import pytest

from recforge.config import RecforgeError
from recforge.prompts import list_prompts, load_prompt, render_chat

TASKS = {
    "kar_user_preference": {"domain": "movies", "profile": "female, 25", "history": [{"title": "Heat", "rating": 5}, {"title": "Up", "rating": 2}]},
    "kar_item_knowledge": {"domain": "books", "title": "Dune", "authors": ["Frank Herbert"]},
    "interest_tags": {"entity_type": "item", "title": "Dune", "authors": ["Frank Herbert"], "year": 1965},
    "notellm_category": {"title": "Dune", "content": "a desert planet"},
    "notellm_hashtags": {"title": "Dune", "topics": ["scifi"], "content": "a desert planet"},
    "item_summary": {"title": "Dune", "description": "a desert planet"},
    "pseudo_queries": {"title": "Dune"},
    "shelf_tags": {"title": "Dune", "authors": ["Frank Herbert"], "year": 1965},
    "audience_reception": {"domain": "books", "title": "Dune", "authors": ["Frank Herbert"]},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_every_task_is_shipped_with_a_valid_spec():
    assert set(list_prompts()) == set(TASKS)
    for name in TASKS:
        t = load_prompt(name)
        assert t.spec.name == name and t.spec.version
        assert t.spec.sampling.max_tokens >= 1
        if t.spec.output.format == "json":
            jsonschema.Draft202012Validator.check_schema(t.spec.output.json_schema)
        assert len(t.template_hash) == 64


@pytest.mark.parametrize("name", sorted(TASKS))
def test_renders_through_the_chat_template(name, tokenizer):
    t = load_prompt(name)
    text = render_chat(tokenizer, t.messages(TASKS[name], "rec-1"))
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n" in text
    if t.spec.system:
        assert text.startswith("<|im_start|>system\n" + t.spec.system.strip())  # shared instructions first
    for value in ("Dune", "Heat"):
        if value in json.dumps(TASKS[name]):
            assert value in text


def test_kar_prompts_list_the_domain_factors_and_ordered_history():
    t = load_prompt("kar_user_preference")
    text = t.render_user(TASKS["kar_user_preference"], "u1")
    assert text.index('"Heat", 5 stars') < text.index('"Up", 2 stars')
    assert "director and actors" in text and "soundtrack" in text
    books = load_prompt("kar_item_knowledge").render_user(TASKS["kar_item_knowledge"], "b1")
    assert 'book "Dune" by Frank Herbert' in books and "author and style" in books


def test_kar_knowledge_schema_accepts_exactly_the_factors_the_prompt_asks_for():
    # the constrained decoder can only write an enum factor: every domain's listed factor must be allowed
    t = load_prompt("kar_item_knowledge")
    allowed = t.output_for().json_schema["properties"]["knowledge"]["items"]["properties"]["factor"]["enum"]
    asked = {f for factors in t.spec.defaults["factors"].values() for f in factors}
    assert asked == set(allowed)


def test_missing_required_field_names_record_and_field():
    t = load_prompt("kar_item_knowledge")
    with pytest.raises(RecforgeError, match=r"record 'book-42' is missing required field 'title'"):
        t.render_user({"domain": "books"}, "book-42")


def test_undefined_template_variable_names_record():
    # `history` is required for users; a user record without it fails by name, not with a blank prompt.
    t = load_prompt("interest_tags")
    with pytest.raises(RecforgeError, match=r"record 'u7'.*history"):
        t.render_user({"entity_type": "user"}, "u7")


@pytest.mark.parametrize("payload", ["{{ 7*7 }}", "{% for x in range(3) %}X{% endfor %}", "{{ ''.__class__.__mro__ }}"])
def test_record_text_is_never_executed(payload, tokenizer):
    t = load_prompt("interest_tags")
    record = {"entity_type": "item", "title": f"Evil {payload} book", "authors": [payload]}
    text = render_chat(tokenizer, t.messages(record, "x"))
    assert f"Evil {payload} book" in text
    assert "49" not in text and "XXX" not in text and "<class" not in text


def test_sandbox_blocks_unsafe_template_source(tmp_path):
    (tmp_path / "bad.j2").write_text("{{ title.__class__.__mro__[1].__subclasses__() }}")
    (tmp_path / "bad.yaml").write_text("name: bad\nversion: '1'\noutput: {format: text}\n")
    t = load_prompt(str(tmp_path / "bad.j2"))
    with pytest.raises(RecforgeError, match="record 'r'"):
        t.render_user({"title": "x"}, "r")


def test_bad_spec_names_file_and_key(tmp_path):
    (tmp_path / "t.j2").write_text("{{ title }}")
    (tmp_path / "t.yaml").write_text("name: t\nversion: '1'\noutput: {format: choice}\n")
    with pytest.raises(RecforgeError, match=r"t.yaml: key 'output.choices' is required"):
        load_prompt(str(tmp_path / "t.j2"))
    (tmp_path / "t.yaml").write_text("name: t\nversion: '1'\noutput: {format: json, schema: {type: 5}}\nsampling: {max_tokenz: 3}\n")
    with pytest.raises(RecforgeError, match=r"sampling.max_tokenz"):
        load_prompt(str(tmp_path / "t.j2"))


def test_taxonomy_narrows_tags_schema():
    t = load_prompt("interest_tags")
    out = t.output_for({"taxonomy": ["fantasy", "romance"]})
    v = jsonschema.Draft202012Validator(out.json_schema)
    assert v.is_valid({"tags": ["fantasy"]})
    assert not v.is_valid({"tags": ["horror"]})
    assert "Choose only from these tags: fantasy, romance" in t.render_user({"entity_type": "item", "title": "x"}, "1", {"taxonomy": ["fantasy", "romance"]})
