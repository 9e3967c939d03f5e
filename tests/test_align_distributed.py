"""Negatives gathered across devices: two gloo CPU ranks, each holding half a batch, compute the same InfoNCE
as one process holding the whole batch (what `loss.gather_across_devices=true` under `accelerate launch` relies on)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recforge.align.losses import InfoNCELoss, PairIdTable

BATCH, DIM = 8, 16
# row 5 repeats row 1's product under another query, and query q3 knows p6 as a positive: both are false
# negatives that sit on the *other* rank's half of the batch, so masking them needs the gathered ids
PAIRS = [{"anchor_id": f"q{i}", "positive_id": f"p{i}", "negative_id": f"n{i}"} for i in range(BATCH)]
PAIRS[5]["positive_id"] = "p1"
PAIRS[3]["anchor_positive_ids"] = ["p6"]


def embeddings(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, DIM, generator=g) for _ in range(3)]  # query, positive, hard negative


def make_loss(gather: bool, symmetric: bool) -> InfoNCELoss:
    return InfoNCELoss(model=None, ids=PairIdTable(PAIRS), temperature=0.1, symmetric=symmetric,
                       mask_false_negatives=True, gather_across_devices=gather)


def single_process(symmetric: bool):
    embs = [e.clone().requires_grad_(True) for e in embeddings()]
    loss = make_loss(False, symmetric).compute_loss_from_embeddings(embs, torch.arange(BATCH))
    loss.backward()
    return loss.detach(), [e.grad for e in embs]


def _rank(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = BATCH // world
        local = slice(rank * half, (rank + 1) * half)
        for symmetric in (False, True):
            embs = [e[local].clone().requires_grad_(True) for e in embeddings()]
            loss = make_loss(True, symmetric).compute_loss_from_embeddings(embs, torch.arange(BATCH)[local])
            loss.backward()
            results[(rank, symmetric)] = (loss.detach(), [e.grad.clone() for e in embs])
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both loss variants computed on 2 gloo ranks in one spawn (process start-up dominates the cost)."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, str(tmp_path_factory.mktemp("dist") / "init"), results), nprocs=2, join=True)
    return dict(results)


def check(two_ranks, symmetric: bool):
    loss, grads = single_process(symmetric)
    (loss0, grads0), (loss1, grads1) = two_ranks[(0, symmetric)], two_ranks[(1, symmetric)]
    # the whole batch's mean loss is the mean of the two ranks' losses (each rank: its rows vs all 8 candidates)
    torch.testing.assert_close((loss0 + loss1) / 2, loss, atol=1e-6, rtol=1e-5)
    # gradients reach the rank that owns each embedding: the gathered copies' gradients are summed back, i.e.
    # d(loss0 + loss1)/d e = 2 * d(mean loss)/d e; DDP then averages parameter gradients over the 2 ranks
    for g, g0, g1 in zip(grads, grads0, grads1):
        torch.testing.assert_close(torch.cat([g0, g1]), 2 * g, atol=1e-6, rtol=1e-5)


def test_gathered_infonce_equals_the_whole_batch_loss_and_gradients(two_ranks):
    check(two_ranks, symmetric=False)


def test_gathered_symmetric_infonce_too(two_ranks):
    check(two_ranks, symmetric=True)


def test_without_gathering_each_rank_sees_only_its_own_negatives():
    """The control: per-rank losses without gathering differ from the whole-batch loss (so the test above can fail)."""
    loss, _ = single_process(False)
    embs = embeddings()
    halves = [make_loss(False, False).compute_loss_from_embeddings([e[s] for e in embs], torch.arange(BATCH)[s])
              for s in (slice(0, 4), slice(4, 8))]
    assert abs(float(sum(halves) / 2 - loss)) > 1e-3
