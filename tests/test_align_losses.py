"""InfoNCE: equals sentence-transformers' MNRL where both apply; masks false negatives; learns its temperature."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

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


ANCHORS = ["usb c cable", "wireless earbuds", "desk lamp", "dear zoo book", "running shoes", "coffee grinder"]
POSITIVES = ["Anker USB-C to USB-C cable, 6ft", "Sonic wireless bluetooth earbuds with charging case",
             "LED desk lamp with dimmer", "Dear Zoo: a lift-the-flap book", "Trail running shoes for men",
             "Burr coffee grinder, 18 settings"]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model.eval()  # no dropout: two losses over the same batch see the same embeddings
    return model


def batch(model, n: int = 6):
    features = [model.preprocess(ANCHORS[:n]), model.preprocess(POSITIVES[:n])]
    return features, torch.arange(n)


def loss_and_grads(loss, model, n: int = 6) -> tuple[float, dict[str, Tensor]]:
    """The loss on one batch and the gradient of every trainable MiniLM weight."""
    model.zero_grad()
    features, labels = batch(model, n)
    value = loss(features, labels)
    value.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return value.item(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol)
    assert ga.keys() == gb.keys() and len(ga) > 50
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=rtol, atol=atol), k


def test_infonce_equals_st_mnrl_on_minilm_when_nothing_is_masked(minilm):
    """Without false negatives to mask, recforge's InfoNCE is sentence-transformers' MNRL: same loss, same gradients."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    table = PairIdTable(pairs([(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(6)]))
    # temperature 0.5: at 0.05 MiniLM already ranks these easy pairs perfectly and the loss is ~4e-5
    ours = loss_and_grads(InfoNCELoss(minilm, table, temperature=0.5, mask_false_negatives=True), minilm)
    st = loss_and_grads(MultipleNegativesRankingLoss(minilm, scale=2.0), minilm)
    assert_same(ours, st)
    assert ours[0] > 0.1  # a real loss, not a saturated batch
    # a known false negative (p1 is also a positive of q0) is masked: the loss changes
    masked = PairIdTable(pairs([("q0", "p0", ["p0", "p1"])] + [(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(1, 6)]))
    assert loss_and_grads(InfoNCELoss(minilm, masked, 0.5), minilm)[0] < ours[0]


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


def test_build_loss_prefers_sentence_transformers(minilm):
    from sentence_transformers.sentence_transformer import losses

    ps = pairs([("q0", "p0", ["p0"])])
    assert type(build_loss(LossConfig(mask_false_negatives=False), minilm, ps)) is losses.MultipleNegativesRankingLoss
    assert type(build_loss(LossConfig(), minilm, ps)) is InfoNCELoss
    with pytest.raises(RecforgeError, match="gradcache"):
        build_loss(LossConfig(gradcache_mini_batch=8), minilm, ps)


def test_gradcache_gives_mnrl_loss_and_gradients_on_minilm(minilm):
    """GradCache (`loss.gradcache_mini_batch`) is an exact memory trick: in mini-batches of 2 the loss and every
    gradient equal plain MNRL's over the whole batch of 6."""
    ps = pairs([(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(6)])
    cfg = LossConfig(mask_false_negatives=False, temperature=0.5)  # an unsaturated loss (see above)
    plain = loss_and_grads(build_loss(cfg, minilm, ps), minilm)
    cached = loss_and_grads(build_loss(cfg.model_copy(update={"gradcache_mini_batch": 2}), minilm, ps), minilm)
    assert plain[0] > 0.1
    assert_same(cached, plain, rtol=1e-3, atol=1e-6)


def test_matryoshka_is_the_sum_of_mnrl_over_the_truncated_dimensions(minilm):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    ps = pairs([(f"q{i}", f"p{i}", [f"p{i}"]) for i in range(6)])
    mat = build_loss(LossConfig(matryoshka_dims=[64, 128], mask_false_negatives=False, temperature=0.5), minilm, ps)
    got = loss_and_grads(mat, minilm)[0]
    features, labels = batch(minilm)
    with torch.no_grad():
        q, d = (minilm(f)["sentence_embedding"] for f in features)
    mnrl = MultipleNegativesRankingLoss(minilm, scale=2.0)
    parts = [mnrl.compute_loss_from_embeddings([q[:, :k], d[:, :k]], labels).item() for k in (384, 128, 64)]
    assert got == pytest.approx(sum(parts), rel=1e-4)
    assert len(set(round(p, 4) for p in parts)) == 3  # truncation really changes the term: three different losses
