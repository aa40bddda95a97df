"""Small helpers over ``torch.distributed`` (rank queries that work before and without init)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "local_rank", "is_main_process", "main_process_first", "all_reduce_host", "all_gather_with_grad", "all_gather_no_grad",
           "release_deepspeed_shm_buffer", "all_reduce_with_grad", "global_sample_gram"]


def rank() -> int:
    """Global rank: from the process group if initialized, else ``$RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """World size: from the process group if initialized, else ``$WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0."""
    return rank() == 0


def release_deepspeed_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU comm op (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19.8) creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MiB) at
    ``init_distributed`` when all ranks are on one machine, and never unlinks it: every run on a new port
    left 132 MiB per 2 ranks in /dev/shm until the machine ran out of memory (seen here: 20 GiB, then
    the OOM killer). The mappings stay valid after unlinking, and the memory is freed when the ranks
    exit, however they exit. Collective (a barrier first, so every rank has opened every buffer);
    no-op without a process group or the file.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    if os.path.exists(name):
        os.unlink(name)


def all_reduce_host(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host (CPU) tensor and return the result on the host; ``x`` itself is unchanged.

    NCCL reduces only CUDA tensors ("No backend type associated with device type cpu", seen on an H100
    with a float64 CPU tensor), gloo and DeepSpeed's CPU backend only CPU ones: the tensor travels to the
    device the default group's backend reduces on (the rank's current accelerator device unless the
    backend is gloo) and back. Collective; returns ``x`` unchanged without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return x
    from deepspeed.accelerator import get_accelerator

    device = "cpu" if dist.get_backend() == "gloo" else get_accelerator().current_device_name()
    y = x.to(device, copy=True)  # a copy also where the device is the CPU: x is never reduced in place
    dist.all_reduce(y, op=op)
    return y.cpu()


def local_rank() -> int:
    """This process's rank on its node: ``$LOCAL_RANK`` (set by the deepspeed launcher and the sbatch
    template), 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def main_process_first(local: bool = False):
    """Rank 0 (with ``local``: local rank 0 of every node) runs the block first, the others after it (so
    they reuse its ``datasets`` cache), as transformers' ``TrainingArguments.main_process_first``. The
    wait is a barrier: the process group's timeout (``--ddp_timeout``) bounds it. No-op without a
    process group."""
    active = dist.is_initialized() and dist.get_world_size() > 1
    first = local_rank() == 0 if local else is_main_process()
    if active and not first:
        dist.barrier()
    try:
        yield
    finally:
        if active and first:
            dist.barrier()


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0: (B, ...) -> (world * B, ...). Shapes must match."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


class _AllGatherGrad(torch.autograd.Function):
    """all_gather in forward; in backward, sum the gathered gradient over ranks and keep the local slice.

    When every rank evaluates the same function of the gathered tensor, the summed gradient is world
    times the true one, which DeepSpeed's gradient averaging divides back: parameters then receive the
    exact gradient of the global-batch loss. all_reduce (not reduce_scatter) so that gloo works too.

    Why not ``torch.distributed.nn.functional.all_gather``: measured here (torch 2.13, gloo), its
    backward gives wrong gradients when the incoming gradient is not contiguous (the FCD sequence term
    computed in one block produces such a gradient): its all-to-all emulation scatters into
    ``empty_like`` buffers that keep the gradient's strides. tests/test_global_batch.py covers that case.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        return all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all_gather along dim 0: (B, ...) -> (world * B, ...); identity without a group.
    Shapes must match across ranks. See :class:`_AllGatherGrad` for the gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllGatherGrad.apply(x)


class _SamplesToChannels(torch.autograd.Function):
    """all_to_all from sample-sharded to channel-sharded: (B, ..., C) -> (world * B, ..., C / world) (C a
    multiple of world). Backward: the inverse all_to_all, so each rank's samples get their gradient back."""

    @staticmethod
    def forward(ctx, x):
        w = dist.get_world_size()
        ctx.shape = x.shape
        parts = x.reshape(*x.shape[:-1], w, x.shape[-1] // w).movedim(-2, 0).contiguous()  # (world, B, ..., C / world)
        out = torch.empty_like(parts)
        dist.all_to_all_single(out, parts)  # row r: rank r's samples, this rank's channel slice
        return out.flatten(0, 1)  # (world * B, ..., C / world)

    @staticmethod
    def backward(ctx, grad):
        w = dist.get_world_size()
        grad = grad.reshape(w, -1, *grad.shape[1:]).contiguous()  # (world, B, ..., C / world): row r goes back to rank r
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad)  # row r: this rank's samples, channel slice r
        return out.movedim(0, -2).reshape(ctx.shape)


class _SumOfIdenticalUses(torch.autograd.Function):
    """all_reduce (sum) in forward; backward ``world * grad``, what all-reducing the gradient gives when every
    rank evaluates the same function of the sum (the convention of :class:`_AllGatherGrad`), with no traffic."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * dist.get_world_size()


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all_reduce (sum) of ``x`` (any shape), returned as a new tensor; identity without a group.

    Backward is ``world * grad`` with no collective: when every rank evaluates the same function of the sum,
    all-reducing the gradient would give exactly that (the convention of :func:`all_gather_with_grad`, whose
    world-times gradient DeepSpeed's averaging divides back). Collective; shapes must match across ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _SumOfIdenticalUses.apply(x)


def global_sample_gram(x: torch.Tensor) -> torch.Tensor:
    """Per-position Gram matrix of the global batch's features, without all-gathering the features.

    (*G, B, N, C) on every rank -> float32 (*G, N, world * B, world * B) on every rank, with
    ``gram[..., n, i, j] = <x_i[n], x_j[n]>`` over the samples of every rank in rank order (as
    :func:`all_gather_no_grad` orders them), products in float32 whatever ``x``'s dtype. The features are
    moved once by all_to_all in their own dtype, so that each rank holds every sample's slice of C / world
    channels ((world - 1) / world of the local bytes sent, against world - 1 times for an all-gather);
    each rank's partial Gram of its channel slice is then all-reduced in float32, its upper triangle only
    (N * m (m + 1) / 2 values for m = world * B; the Gram is symmetric).
    Differentiable: the gradient reaches each rank's own samples by the inverse all_to_all, scaled as
    :func:`all_gather_with_grad`'s (world times the gradient of the one loss every rank computes, which
    DeepSpeed's averaging divides back; the Gram's own backward needs no collective). C is zero-padded to a
    multiple of world (zeros add nothing to a product). Identity Gram of ``x`` without a process group.
    Collective; shapes must match across ranks. gloo and NCCL (all_to_all_single, all_reduce).
    """
    h = x.movedim(-3, 0)  # (B, *G, N, C)
    if dist.is_initialized() and dist.get_world_size() > 1:
        w = dist.get_world_size()
        if h.shape[-1] % w:
            h = torch.nn.functional.pad(h, (0, w - h.shape[-1] % w))
        h = _SamplesToChannels.apply(h)  # (world * B, *G, N, C / world)
    h = h.float().movedim(0, -2)  # (*G, N, world * B, c)
    gram = h @ h.transpose(-1, -2)  # (*G, N, world * B, world * B): this rank's channel slice
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return gram
    m = gram.shape[-1]
    upper = torch.triu_indices(m, m, device=gram.device)  # (2, T), T = m (m + 1) / 2
    packed = all_reduce_with_grad(gram[..., upper[0], upper[1]])  # (*G, N, T): the symmetric sum's upper triangle, half the bytes
    where = torch.zeros(m, m, dtype=torch.long, device=gram.device)
    where[upper[0], upper[1]] = torch.arange(upper.shape[1], device=gram.device)
    return packed[..., torch.maximum(where, where.t())]  # (*G, N, m, m), both triangles from the packed one
