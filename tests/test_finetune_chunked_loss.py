"""The chunked lm_head + cross-entropy: the stock causal-LM loss and gradients, without the full logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from recforge.finetune.chunked_loss import causal_lm_parts, chunked_causal_lm_loss, linear_cross_entropy
from recforge.finetune.tokens import trainable_token_modules


def lora_model(model_dir, token_ids=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # as in training: a cache would turn off the packed-document mask
    trainable = {n: token_ids for n in trainable_token_modules(model)} if token_ids else None
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             trainable_token_indices=trainable, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # nonzero adapters, so every LoRA gradient is exercised
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 37), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 30:] = -100  # padding
    labels[1, 12] = -100  # a packed document start
    pos = torch.cat([torch.arange(12), torch.arange(25)]).repeat(3, 1)  # two packed documents per row
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 91], ids=["mean", "num_items_in_batch"])
def test_chunked_loss_equals_the_stock_loss_and_gradients(tiny_model_dir, num_items):
    model = lora_model(tiny_model_dir)
    b = batch(model.config.vocab_size)
    extra = {"num_items_in_batch": num_items} if num_items else {}
    stock, g_stock = loss_and_grads(model, lambda: model(**b, **extra).loss)
    chunked, g_chunked = loss_and_grads(model, lambda: chunked_causal_lm_loss(model, b, num_items, chunk_size=16))
    assert chunked == pytest.approx(stock, rel=1e-5)
    assert set(g_chunked) == set(g_stock) and len(g_stock) > 10
    for name, g in g_stock.items():
        assert torch.allclose(g_chunked[name], g, rtol=1e-4, atol=1e-6), name


def test_added_token_rows_train_through_the_chunked_loss(tiny_model_dir):
    model = lora_model(tiny_model_dir, token_ids=[3, 7])  # peft TrainableTokens on embedding (+ lm_head)
    b = batch(model.config.vocab_size)
    b["labels"][:, 20] = 7  # the added token is a target, so its lm_head row gets a gradient
    _, g_stock = loss_and_grads(model, lambda: model(**b).loss)
    _, g_chunked = loss_and_grads(model, lambda: chunked_causal_lm_loss(model, b, chunk_size=8))
    deltas = [n for n in g_stock if "trainable_tokens_delta" in n]
    assert deltas
    for name in deltas:
        assert torch.allclose(g_chunked[name], g_stock[name], rtol=1e-4, atol=1e-7), name


def test_bf16_autocast_matches_within_bf16_rounding(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    b = batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = float(model(**b).loss)
        chunked = float(chunked_causal_lm_loss(model, b, chunk_size=16))
    assert chunked == pytest.approx(stock, rel=2e-3)


def test_linear_cross_entropy_against_the_definition():
    torch.manual_seed(0)
    h = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(11, 6, requires_grad=True)
    t = torch.randint(0, 11, (10,))
    want = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum") / 4.0
    want.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, divisor=4, chunk_size=3)
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert torch.allclose(h.grad, gh, atol=1e-6) and torch.allclose(w.grad, gw, atol=1e-6)


def test_other_heads_keep_the_stock_loss(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert causal_lm_parts(model) is not None
    model.config.model_type = "gemma2"  # soft-capped logits: the chunked path would be wrong, so it steps aside
    assert causal_lm_parts(model) is None
    assert chunked_causal_lm_loss(model, batch(cfg["vocab_size"])) is None
