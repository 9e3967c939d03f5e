"""Packing: isolated packed loss == unpacked per-document loss; connected rows attend within, never across."""

from __future__ import annotations

import pytest
import torch

from recforge.finetune.cpt import load_model_and_tokenizer
from recforge.finetune.cpt_config import CPTConfig
from recforge.finetune.demo import esci_rows
from recforge.finetune.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    build_dataset,
    pack_segments,
    row_segments,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    cfg = CPTConfig.model_validate(
        {"model": {"path": str(tiny_model_dir)}, "data": {"train": {"x": {"path": "unused"}}}, "mode": "full"}
    )
    model, tok = load_model_and_tokenizer(cfg)
    model.eval()
    return model, tok


def unpacked_token_mean_loss(model, segments):
    """Sum of per-token losses of each document run alone, divided by the number of predicted tokens."""
    total, count = 0.0, 0
    for seg in segments:
        ids = torch.tensor([seg])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.double()
        total += float(loss) * (len(seg) - 1)
        count += len(seg) - 1
    return total / count


def test_isolated_packed_loss_equals_unpacked(model_and_tokenizer):
    model, tok = model_and_tokenizer
    docs = [r["documents"][0] for r in esci_rows()[:40]]
    segments = [s for d in docs for s in row_segments(tok, [d], "isolated", 128)]
    ds = build_dataset(segments, "isolated", 128)
    assert len(ds) < len(segments)  # several documents really share a row
    batch = PackedCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = float(model(**batch).loss)
    expected = unpacked_token_mean_loss(model, segments)
    assert abs(packed - expected) <= 1e-4, (packed, expected)

    # the same documents with position ids NOT reset (plain concatenation) give a different loss:
    naive = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        assert abs(float(model(**naive).loss) - expected) > 1e-3


def test_padded_batches_match_too(model_and_tokenizer):
    model, tok = model_and_tokenizer
    segments = [row_segments(tok, [r["documents"][0]], "off", 128)[0] for r in esci_rows()[:12]]
    batch = PaddedCollator(tok.pad_token_id)([{"input_ids": s} for s in segments])
    with torch.no_grad():
        padded = float(model(**batch).loss)
    assert abs(padded - unpacked_token_mean_loss(model, segments)) <= 1e-4


def test_connected_rows_attend_within_not_across(model_and_tokenizer):
    model, tok = model_and_tokenizer
    row_a = ["wireless earbuds bluetooth", "earbuds with charging case"]
    row_b = ["dear zoo lift the flap book"]
    seg_a = row_segments(tok, row_a, "connected", 128)
    seg_b = row_segments(tok, row_b, "connected", 128)
    assert len(seg_a) == 1  # the two related documents form one attention segment
    batch = PackedCollator(tok.pad_token_id)([{"segments": seg_a + seg_b}])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone_b = model(input_ids=torch.tensor(seg_b)).logits[0]
        # second document of row A, run without the first one: its logits change (it saw doc 1 in context)
        doc2 = row_segments(tok, [row_a[1]], "isolated", 128)[0]
        alone_doc2 = model(input_ids=torch.tensor([doc2])).logits[0]
    n_a = len(seg_a[0])
    assert torch.allclose(logits[n_a:n_a + len(seg_b[0])], alone_b, atol=1e-4)  # row B never sees row A
    assert not torch.allclose(logits[n_a - len(doc2):n_a], alone_doc2, atol=1e-3)


def test_pack_segments_keeps_every_token_and_bounds_rows():
    import random

    rng = random.Random(0)
    segments = [[1] * rng.randint(2, 60) for _ in range(500)]
    rows = pack_segments(segments, 128)
    assert sorted(len(s) for r in rows for s in r) == sorted(len(s) for s in segments)
    assert all(sum(len(s) for s in r) <= 128 for r in rows)
    fill = sum(len(s) for s in segments) / (128 * len(rows))
    assert fill >= 0.98


def test_long_documents_are_chunked_with_labels_per_chunk(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = " ".join(["socks"] * 300)
    segs = row_segments(tok, [text], "isolated", 64)
    assert len(segs) > 1 and all(len(s) <= 64 for s in segs)
    batch = PackedCollator(tok.pad_token_id)([{"segments": segs[:2]}])
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[len(segs[0])] == IGNORE_INDEX
