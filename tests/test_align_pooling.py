"""Pooling of a causal LM: the vector is the hidden state a user expects, under left and right padding."""

from __future__ import annotations

import functools

import pytest
import torch

from recforge.align.align_config import BackboneConfig, PoolingConfig
from recforge.align.pooling import build_embedding_model

TEXTS = ["red shoes", "a much longer product title with many words in it, size 10, blue", "usb c cable 2m braided"]


@functools.lru_cache(maxsize=2)
def hf_model(model_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir).eval()


def hf_hidden(model_dir, input_ids: list[int]) -> torch.Tensor:
    """Hidden states of one unpadded sequence straight from transformers (the reference)."""
    model = hf_model(model_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).last_hidden_state[0]


def build(tiny_model_dir, mode, prompts=None, **pooling):
    model, info = build_embedding_model(
        BackboneConfig(path=str(tiny_model_dir), max_seq_length=48), PoolingConfig(mode=mode, normalize=False, **pooling),
        prompts,
    )
    return model.eval(), info


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_is_the_appended_eos_state(tiny_model_dir, side):
    model, info = build(tiny_model_dir, "last_token")
    assert info["kind"] == "causal_lm" and info["pooling"] == "last_token"
    tok = model[0].tokenizer
    tok.padding_side = side
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    batch = model.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    for text, vec in zip(TEXTS, batch):
        ids = tok(text)["input_ids"]
        expected = hf_hidden(tiny_model_dir, ids)[-1]
        assert torch.allclose(vec, expected, atol=1e-4), (side, text)


def test_eos_survives_truncation(tiny_model_dir):
    model, _ = build(tiny_model_dir, "last_token")
    long_text = " ".join(["word"] * 500)
    features = model.preprocess([long_text, "short"])
    ids = features["input_ids"]
    assert ids.shape[1] == 48
    assert ids[0, -1].item() == model[0].tokenizer.eos_token_id


def test_compression_token_state_before_emb(tiny_model_dir):
    """NoteLLM: the vector is the hidden state just before `[EMB]` in `... compress it into one word: "[EMB]"`."""
    from transformers import AutoTokenizer

    model, info = build(tiny_model_dir, "compression")
    assert info["pooling"] == "compression"
    model[0].tokenizer.padding_side = "left"
    vecs = model.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref_tok.add_special_tokens({"additional_special_tokens": ["[EMB]"]})
    emb_id = ref_tok.convert_tokens_to_ids("[EMB]")
    for text, vec in zip(TEXTS, vecs):
        ids = ref_tok(text + ' compress it into one word: "')["input_ids"] + [emb_id] + ref_tok('"', add_special_tokens=False)["input_ids"]
        pos = ids.index(emb_id)
        ids_known = [i if i != emb_id else ref_tok.eos_token_id for i in ids]  # the state before [EMB] cannot see it
        expected = hf_hidden(tiny_model_dir, ids_known)[pos - 1]
        assert torch.allclose(vec, expected, atol=1e-4), text


def prompt_positions(tok, prompt: str, text: str) -> int:
    """Token positions of `prompt + text` that hold the prompt only, read from the joined text's offsets."""
    enc = tok(prompt + text, return_offsets_mapping=True)
    return next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(prompt)), len(enc["input_ids"]))


def test_mean_pooling_excludes_instruction(tiny_model_dir):
    prompt = "Represent this shopping query for retrieval: "
    model, info = build(tiny_model_dir, "mean", prompts={"query": prompt})
    tok = model[0].tokenizer
    vec = model.encode(["red shoes"], prompt_name="query", convert_to_tensor=True)[0]
    full = tok(prompt + "red shoes")["input_ids"]
    n_prompt = prompt_positions(tok, prompt, "red shoes")
    hidden = hf_hidden(tiny_model_dir, full)
    assert torch.allclose(vec, hidden[n_prompt:].mean(0), atol=1e-4)
    assert not torch.allclose(vec, hidden.mean(0), atol=1e-3)  # the prompt really is left out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", ["Query: ", "Represent this query:\n"])
def test_prompt_ending_in_a_space_keeps_the_first_word(tiny_model_dir, prompt, side):
    """Issue 25: a prompt ending in a space tokenized alone has one token more than it takes in front of a text
    (the space merges into the first word), so mean pooling dropped the first word and a one-word query became a
    zero vector. The count must come from the joined text."""
    model, info = build(tiny_model_dir, "mean", prompts={"query": prompt})
    tok = model[0].tokenizer
    tok.padding_side = side
    # a one-token query (its word merged with the prompt's space)
    words = [w for w in ("the", "a", "red", "of", "and", "book", "in") if len(tok(prompt + w)["input_ids"]) == prompt_positions(tok, prompt, w) + 1]
    assert words, "no one-token word in the tiny vocabulary"
    texts = [words[0], "red shoes", "a much longer product title with many words in it"]
    vecs = model.encode(texts, prompt_name="query", convert_to_tensor=True, batch_size=3)
    assert vecs[0].abs().sum() > 0, "a one-word query must not be a zero vector"
    assert info["prompt_tokens"][prompt] == prompt_positions(tok, prompt, "red")
    for text, vec in zip(texts, vecs):
        full = tok(prompt + text)["input_ids"]
        hidden = hf_hidden(tiny_model_dir, full)
        n_prompt = prompt_positions(tok, prompt, text)
        assert torch.allclose(vec, hidden[n_prompt:].mean(0), atol=1e-4), (prompt, text)  # first content word counts
    model.max_seq_length = 48
    # the exported folder (plain sentence-transformers) counts the same way
    import tempfile

    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        loaded = SentenceTransformer(d)
        loaded[0].tokenizer.padding_side = side
        again = loaded.encode(texts, prompt_name="query", convert_to_tensor=True, batch_size=3)
    assert torch.allclose(vecs, again, atol=1e-5)


def test_prompt_count_checked_for_every_mode(tiny_model_dir):
    for mode in ("last_token", "compression", "mean"):
        model, info = build(tiny_model_dir, mode, prompts={"query": "Query: "})
        tok = model[0].tokenizer
        assert info["prompt_tokens"]["Query: "] == prompt_positions(tok, "Query: ", "red")
        # the count sentence-transformers uses for `prompt_length` agrees wherever the pooling reads it
        if mode != "compression":  # its appended suffix is no special token; the prompt is pooled over anyway
            assert model[0]._get_prompt_length("Query: ") == info["prompt_tokens"]["Query: "]


def test_num_layers_keeps_the_first_layers(tiny_model_dir):
    """backbone.num_layers=N: the vector is built from layer N's states, exported config has N layers."""
    import json
    import tempfile

    from transformers import AutoModel

    model, info = build_embedding_model(BackboneConfig(path=str(tiny_model_dir), max_seq_length=48, num_layers=1),
                                        PoolingConfig(mode="mean", normalize=False))
    assert info["num_layers"] == 1
    ref = AutoModel.from_pretrained(tiny_model_dir, num_hidden_layers=1).eval()
    tok = model[0].tokenizer
    vec = model.encode(["red shoes"], convert_to_tensor=True)[0]
    with torch.no_grad():
        hidden = ref(input_ids=torch.tensor([tok("red shoes")["input_ids"]])).last_hidden_state[0]
    assert torch.allclose(vec, hidden.mean(0), atol=1e-4)
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        assert json.loads(open(f"{d}/config.json").read())["num_hidden_layers"] == 1


def test_projection_and_normalisation(tiny_model_dir):
    model, info = build_embedding_model(
        BackboneConfig(path=str(tiny_model_dir)), PoolingConfig(mode="last_token", projection_dim=32, projection="mlp")
    )
    vecs = model.encode(TEXTS, convert_to_tensor=True)
    assert vecs.shape == (3, 32) and info["embedding_dim"] == 32
    assert torch.allclose(vecs.norm(dim=1), torch.ones(3), atol=1e-5)
