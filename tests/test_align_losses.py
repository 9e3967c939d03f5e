"""InfoNCE: equals sentence-transformers' MNRL where both apply; masks false negatives; learns its temperature."""

from __future__ import annotations

import pytest
import torch

from recforge.align.align_config import LossConfig
from recforge.align.losses import InfoNCELoss, PairIdTable, build_loss
from recforge.config import RecforgeError


def pairs(specs):
    """specs: (anchor_id, positive_id, known positive ids)."""
    return [{"anchor_id": a, "positive_id": p, "negative_id": None, "anchor_positive_ids": known, "weight": 1.0}
            for a, p, known in specs]


def random_embeddings(n, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


def test_matches_st_mnrl_without_false_negatives():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    table = PairIdTable(pairs([(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(6)]))
    q, d = random_embeddings(6)
    ours = InfoNCELoss(None, table, temperature=0.05, mask_false_negatives=True)
    st = MultipleNegativesRankingLoss.__new__(MultipleNegativesRankingLoss)
    torch.nn.Module.__init__(st)
    st.__dict__.update(scale=20.0, gather_across_devices=False, directions=("query_to_doc",), partition_mode="joint",
                       hardness_mode=None, hardness_strength=0.0)
    from sentence_transformers.util import cos_sim

    st.similarity_fct = cos_sim
    labels = torch.arange(6)
    assert torch.allclose(ours.compute_loss_from_embeddings([q, d], labels),
                          st.compute_loss_from_embeddings([q, d], labels), atol=1e-5)


def test_false_negatives_are_masked():
    # Row 1's positive p1 is also a known positive of q0; row 2 repeats item p0 under another query.
    table = PairIdTable(pairs([("q0", "p0", ["p0", "p1"]), ("q1", "p1", ["p1"]), ("q2", "p0", ["p0"])]))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    d = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, 0.0]])  # p1 looks like p0: a false negative for q0
    labels = torch.arange(3)
    masked = InfoNCELoss(None, table, 0.05, mask_false_negatives=True)
    unmasked = InfoNCELoss(None, table, 0.05, mask_false_negatives=False)
    mask = masked._false_negative_mask([0, 1, 2], [0, 1, 2], 1)
    assert mask.tolist() == [[True, True, True], [False, True, False], [True, False, True]]
    from sentence_transformers.util import cos_sim

    s = cos_sim(q, d) * 20.0
    ce = lambda logits, target: -torch.log_softmax(logits, 0)[target]  # noqa: E731
    # q0: both other candidates are its positives -> only its own remains (loss 0); q2: row 0 is the same item.
    expected = (torch.tensor(0.0) + ce(s[1], 1) + ce(s[2, 1:], 1)) / 3
    got = masked.compute_loss_from_embeddings([q, d], labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert unmasked.compute_loss_from_embeddings([q, d], labels) > got


def test_symmetric_and_learnable_temperature_train():
    table = PairIdTable(pairs([(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(4)]))
    loss = InfoNCELoss(None, table, temperature=0.05, learnable_temperature=True, symmetric=True)
    q, d = random_embeddings(4, seed=1)
    q.requires_grad_(True)
    value = loss.compute_loss_from_embeddings([q, d], torch.arange(4))
    value.backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs() > 0
    assert q.grad is not None
    # The symmetric term is the doc->query cross-entropy: swap roles and the forward term matches it.
    fwd = InfoNCELoss(None, table, 0.05).compute_loss_from_embeddings([q.detach(), d], torch.arange(4))
    bwd = InfoNCELoss(None, table, 0.05).compute_loss_from_embeddings([d, q.detach()], torch.arange(4))
    sym = InfoNCELoss(None, table, 0.05, symmetric=True).compute_loss_from_embeddings([q.detach(), d], torch.arange(4))
    assert sym.item() == pytest.approx(0.5 * (fwd.item() + bwd.item()), rel=1e-5)


def test_build_loss_prefers_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    ps = pairs([("q0", "p0", ["p0"])])
    assert isinstance(build_loss(LossConfig(mask_false_negatives=False), model, ps), losses.MultipleNegativesRankingLoss)
    cached = build_loss(LossConfig(mask_false_negatives=False, gradcache_mini_batch=8), model, ps)
    assert isinstance(cached, losses.CachedMultipleNegativesRankingLoss)
    assert isinstance(build_loss(LossConfig(), model, ps), InfoNCELoss)
    mat = build_loss(LossConfig(matryoshka_dims=[64, 128]), model, ps)
    assert isinstance(mat, losses.MatryoshkaLoss) and mat.matryoshka_dims == (384, 128, 64)
    with pytest.raises(RecforgeError, match="gradcache"):
        build_loss(LossConfig(gradcache_mini_batch=8), model, ps)
