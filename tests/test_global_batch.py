"""FCD_SPEC: the loss is the same whether the batch is split over data-parallel ranks or not, when the
global-batch option all-gathers features; and the averaged parameter gradient is the full-batch one.
Two real gloo ranks (torch.multiprocessing), no DeepSpeed needed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from fcd_ds.losses import fcd_loss, fcd_pair_terms, fcd_terms


def _inputs():
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(6, 10, 8, generator=g, dtype=torch.float64)  # (global B, N, C_in)
    h_t = torch.randn(6, 10, 12, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)  # a shared "student parameter"
    mask = (torch.arange(10)[None, :] < torch.tensor([10, 7, 9, 10, 4, 8])[:, None]).long()
    return x_s, h_t, w, mask


def _pairs(x_s, h_t, w):
    """Two layer pairs from one student parameter: (B, N, 8) student and (B, N, 12) teacher features each."""
    h = x_s @ w
    return [h, torch.tanh(h)], [h_t, h_t.flip(-1)]


def _full(kind, positions):
    x_s, h_t, w, mask = _inputs()
    w = w.clone().requires_grad_(True)
    loss = fcd_loss(x_s @ w, h_t, mask, sequence_relation=kind, sequence_positions=positions)
    loss.backward()
    hs, ht = _pairs(x_s, h_t, w)
    pairs = sum(sum(fcd_terms(a, b, mask, sequence_relation=kind, sequence_positions=positions)) for a, b in zip(hs, ht))  # one pair at a time
    return loss.item(), w.grad, pairs.item(), torch.autograd.grad(pairs, w)[0]


def _worker(rank, port, kind, positions, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x_s, h_t, w, mask = _inputs()
    part = slice(3 * rank, 3 * rank + 3)
    w = w.clone().requires_grad_(True)
    # chunk_size None: the sequence term in one block, whose gradient w.r.t. the gathered features is not
    # contiguous (torch.distributed.nn.functional.all_gather got that case wrong on gloo)
    loss = fcd_loss(x_s[part] @ w, h_t[part], mask[part], sequence_relation=kind, global_batch=True, chunk_size=None,
                    sequence_positions=positions)
    loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= 2  # DeepSpeed's data-parallel gradient averaging
    # The layer pairs stacked (the engine's path on GPUs): the gathers move the pair dimension behind B.
    hs, ht = _pairs(x_s[part], h_t[part], w)
    pairs = sum(sum(t) for t in fcd_pair_terms(hs, ht, mask[part], sequence_relation=kind, global_batch=True, stack=True,
                                                sequence_positions=positions))
    pair_grad = torch.autograd.grad(pairs, w)[0]
    dist.all_reduce(pair_grad)
    out[rank] = (loss.item(), w.grad.clone(), pairs.item(), pair_grad / 2)
    dist.destroy_process_group()


def _split(kind, positions):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), kind, positions, out), nprocs=2, join=True)
        return dict(out)


def test_global_batch_loss_and_gradient_match_one_process():
    # position relation at every position, at 4 of the 10 (--fcd_sequence_positions), and pooled
    for kind, positions in (("position", None), ("position", 4), ("pooled", None)):
        full_loss, full_grad, full_pairs, full_pair_grad = _full(kind, positions)
        results = _split(kind, positions)
        for rank in (0, 1):
            loss, grad, pairs, pair_grad = results[rank]
            assert abs(loss - full_loss) < 1e-5, (kind, rank, loss, full_loss)
            assert torch.allclose(grad, full_grad, atol=1e-5), kind
            assert abs(pairs - full_pairs) < 1e-5, (kind, rank, pairs, full_pairs)
            assert torch.allclose(pair_grad, full_pair_grad, atol=1e-5), kind
