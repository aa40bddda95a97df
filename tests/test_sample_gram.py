"""fcd_ds.runtime.distributed.global_sample_gram (issue 21): the global batch's per-position Gram matrices from
an all_to_all and an all-reduce equal those of the all-gathered features, with the all-gather's gradient
convention, and FCD's global-batch loss stays finite on a zero feature vector. Two real gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from fcd_ds.losses import fcd_loss
from fcd_ds.runtime.distributed import all_gather_with_grad, global_sample_gram


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)  # (G, B, N, C): C = 5, not a multiple of 2
    weight = torch.randn(2, 6, 6, 6, generator=torch.Generator().manual_seed(7))  # the same function of the Gram on both ranks
    gram = global_sample_gram(x)  # (G, N, 6, 6)
    (gram * weight).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    full = all_gather_with_grad(y.movedim(1, 0)).movedim(0, 1).float().movedim(-2, 1)  # (G, N, 6, C) of the gathered samples
    reference = full @ full.transpose(-1, -2)
    (reference * weight).sum().backward()
    h = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    with torch.no_grad():
        h[0, 1] = 0.0  # a zero feature vector
    loss = fcd_loss(h, torch.randn(2, 6, 7, generator=g), torch.ones(2, 6, dtype=torch.long), global_batch=True)
    loss.backward()
    out[rank] = (gram.detach(), reference.detach(), x.grad, y.grad, loss.item(), bool(torch.isfinite(h.grad).all()))
    dist.destroy_process_group()


def test_global_sample_gram_matches_the_gathered_gram_and_gradient():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        gram, reference, grad, reference_grad, loss, finite = results[rank]
        assert gram.shape == (2, 6, 6, 6) and gram.dtype == torch.float32
        assert torch.allclose(gram, reference, atol=1e-5), rank
        assert torch.allclose(grad, reference_grad, atol=1e-4), rank
        assert 0.0 < loss < 4.0 and finite, (rank, loss)
    assert torch.equal(results[0][0], results[1][0])  # every rank holds the same global Gram
