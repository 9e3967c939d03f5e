"""Added special tokens: where their new embedding / lm_head rows start, before any training."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recforge.finetune.tokens import add_special_tokens


def _load(tiny_model_dir):
    return (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
            AutoTokenizer.from_pretrained(tiny_model_dir))


def test_mean_init_puts_new_rows_at_the_mean_of_the_old_rows(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = add_special_tokens(model, tok, ["<|title|>", "<|brand|>"], init="mean")

    assert len(tok) == old_in.shape[0] + 2 and ids == tok.convert_tokens_to_ids(["<|title|>", "<|brand|>"])
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for i in ids:
        torch.testing.assert_close(new_in[i], old_in.mean(0))
        torch.testing.assert_close(new_out[i], old_out.mean(0))
    torch.testing.assert_close(new_in[: old_in.shape[0]], old_in)  # existing rows untouched
    # the token is one piece, not split by the BPE
    assert tok("<|title|> lamp", add_special_tokens=False)["input_ids"][0] == ids[0]


def test_description_init_uses_the_description_tokens_rows(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    desc_ids = tok("product title", add_special_tokens=False)["input_ids"]
    [new_id, plain_id] = add_special_tokens(model, tok, ["<|title|>", "<|misc|>"], init="description",
                                            descriptions={"<|title|>": "product title"})

    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[new_id], old_in[desc_ids].mean(0))
    # no description: falls back to the mean of all rows
    torch.testing.assert_close(emb[plain_id], old_in.mean(0))
    assert not torch.allclose(emb[new_id], emb[plain_id])


def test_tokens_already_in_the_vocabulary_are_not_added_again(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = add_special_tokens(model, tok, ["<|im_start|>"])
    assert ids == [tok.convert_tokens_to_ids("<|im_start|>")]
    assert model.get_input_embeddings().weight.shape[0] == rows
