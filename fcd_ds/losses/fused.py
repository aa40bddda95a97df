"""Logit losses fused with the LM head: next-token cross-entropy and logit KD computed from the last
hidden states and the head weights a chunk of tokens at a time, so no (B, N, V) logits are ever held.

Each chunk's logits ``h_c @ W.T (+ b)`` give the chunk's loss and, in the same pass, the gradient of the
loss w.r.t. the chunk's hidden states and (summed over chunks) w.r.t. the head weight and bias; only
those gradients are kept, O(B N C + V C) memory, and backward scales them by the incoming gradient.
This is the scheme of Liger-Kernel's ``LigerFusedLinearDistillationBase`` (``chunked_loss/
fused_linear_distillation.py``) and TRL's chunked distillation loss (256-token chunks), written here for
our own masks, shift and reductions: the values equal :func:`~fcd_ds.losses.lm.causal_lm_loss` and
:func:`~fcd_ds.losses.kd.logit_kd_loss` on the materialised logits.

Not a wrapper of Liger-Kernel: its chunked losses (0.8.5, pure torch) run on this CPU and equal ours in
float32, but one call applies one target mask to CE and KD while ours differ (KD counts every attended
position, CE the shifted targets), so our values take two calls that compute the student logits twice;
with bf16 inputs it takes the KD softmax and the weight-gradient sum in bf16 (KD 1.3% off); and it
requires triton (about 1 GB installed).

Precision: the head matmuls run in the inputs' dtype (as the model's own head would, e.g. bf16 with
float32 accumulation inside the matmul), except the gradient matmuls of a float16 head, which run in
float32 so that no gradient underflows before the loss scale multiplies it in backward; softmaxes, losses
and the gradient sums over chunks run in float32 (float64 for float64 inputs). Heads that do more than ``h @ W.T + b`` (logit soft-capping,
logit scaling) are not covered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CHUNK_SIZE", "FusedLogitLosses", "fused_linear_ce_kd", "fused_linear_cross_entropy", "fused_linear_kd"]

DEFAULT_CHUNK_SIZE = 256  # tokens per chunk: TRL's size; a (256, 49152) float32 chunk is 48 MiB
IGNORE = -100
CPU_VOCAB_TILE: int | None = 512  # vocabulary rows per logits matmul on a CPU (_Head.logits_into); None: one


class FusedLogitLosses(NamedTuple):
    """``loss = ce_weight * ce + kd_weight * kd`` carries the gradient; ``ce`` and ``kd`` are the unweighted
    terms, detached, for logging (None when their weight is 0)."""

    loss: torch.Tensor
    ce: torch.Tensor | None
    kd: torch.Tensor | None


class _Head(NamedTuple):
    hidden: torch.Tensor  # (M, C) flattened tokens
    weight: torch.Tensor  # (V, C)
    bias: torch.Tensor | None  # (V,)

    def logits_into(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """The chunk's logits ``h[rows] @ W.T (+ b)`` written into ``out`` (n, V), a held contiguous buffer of
        the accumulation dtype; the matmul runs in the head's dtype (as the model's own head: bf16 with float32
        accumulation inside the matmul).

        On a CPU, writing into a held buffer saves about 25 ms of page faults per fresh (256, 49152) float32
        tensor, and the matmul is computed :data:`CPU_VOCAB_TILE` vocabulary rows at a time, each tile
        ``W[j:j+tile] @ h.T`` written straight into the column-major view ``out[:, j:j+tile].T`` (BLAS takes the
        stride: no copy): MKL's single (256 x 576) @ (576 x 49152) call ran at about 60% of the rate of the same
        FLOPs tiled (218 against 127-152 ms on the 2-core x86 CPU of benchmarks/RESULTS.md), and 512-row tiles
        ran the fused KD 3-4% faster than 1024. A bf16 head on a CPU computes each tile in bf16 and copies it.
        On a GPU (or with ``CPU_VOCAB_TILE`` None), one matmul."""
        h = self.hidden[rows]  # (n, C)
        vocab = self.weight.shape[0]
        tile = CPU_VOCAB_TILE if out.device.type == "cpu" else None
        if tile is None or tile >= vocab:
            if h.dtype == out.dtype:
                torch.mm(h, self.weight.T, out=out)
            else:
                out.copy_(h @ self.weight.T)
        else:
            for j in range(0, vocab, tile):
                w = self.weight[j : j + tile]  # (tile, C)
                if h.dtype == out.dtype:
                    torch.mm(w, h.T, out=out[:, j : j + w.shape[0]].T)  # (tile, n), written column-major into out
                else:
                    out[:, j : j + w.shape[0]].copy_(h @ w.T)  # (n, tile)
        return out if self.bias is None else out.add_(self.bias)


def _ce_chunk(z: torch.Tensor, target: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of next-token cross-entropies over the chunk's counted rows and, when ``grad``, their gradient
    w.r.t. the logits row by row, ``softmax(z) - one_hot(target)`` (rows not counted are not zeroed: the caller
    scales rows). z: (n, V), overwritten (it holds the gradient); target: (n,), IGNORE = not counted."""
    valid = target != IGNORE  # (n,)
    safe = target.clamp(min=0)[:, None]  # (n, 1)
    log_p = torch.log_softmax(z, dim=-1, out=z)  # (n, V), in place
    loss = -torch.where(valid, log_p.gather(1, safe)[:, 0], 0.0).sum()
    if not grad:
        return loss, None
    g = log_p.exp_()  # softmax, (n, V)
    return loss, g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))  # softmax - one_hot(target)


def _kd_chunk(z_s: torch.Tensor, z_t: torch.Tensor, p_t: torch.Tensor, keep: torch.Tensor, temperature: float, grad: bool):
    """Sum over the chunk's kept rows of ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (the ops of
    :func:`logit_kd_loss`) and, when ``grad``, ``softmax(z_s/T) - p_t`` row by row (the gradient w.r.t. z_s
    divided by T; rows not kept are not zeroed: the caller scales rows). All (n, V); z_s and z_t are
    overwritten (z_s holds the gradient), p_t is a buffer for the teacher's probabilities; keep: (n,) bool."""
    if temperature != 1.0:
        z_s.div_(temperature)
        z_t.div_(temperature)
    log_p_t = torch.log_softmax(z_t, dim=-1, out=z_t)  # (n, V), in place
    torch.exp(log_p_t, out=p_t)
    log_p_s = torch.log_softmax(z_s, dim=-1, out=z_s)
    kl = log_p_t.sub_(log_p_s).mul_(p_t).sum(-1)  # (n,): sum_v p_t (log p_t - log p_s), torch's cascade sum
    loss = temperature**2 * torch.where(keep, kl, 0.0).sum()
    return loss, (log_p_s.exp_().sub_(p_t) if grad else None)


def _chunk_loop(student: _Head, teacher: _Head | None, targets, keep, counts, weights, *, temperature: float,
                chunk_size: int, needs: tuple[bool, bool, bool]):
    """Loss sums ``(ce_sum, kd_sum)`` over all tokens and, for ``needs = (hidden, weight, bias)``, the gradients
    of ``ce_weight * ce_sum / ce_count + kd_weight * kd_sum / kd_count`` (float32 sums over chunks).
    targets: (M,) or None (no CE); keep: (M,) bool or None (no KD); counts, weights: (ce, kd) pairs.

    Four (chunk, V) buffers at most, allocated once per call and reused by every chunk: the student's logits,
    the teacher's, the teacher's probabilities, and a copy of the student's logits when both CE and KD read
    them. Row scales (1/count, weight, mask, T) are applied to the small (chunk, C) side of the gradient
    matmuls, not to the (chunk, V) gradient."""
    acc = torch.promote_types(student.hidden.dtype, torch.float32)
    m, vocab = student.hidden.shape[0], student.weight.shape[0]
    dev = student.hidden.device
    ce_scale, kd_scale = (w / c for w, c in zip(weights, counts))
    grad = any(needs)
    rows_max = min(chunk_size, m)
    buf = lambda: torch.empty(rows_max, vocab, dtype=acc, device=dev)  # noqa: E731  (chunk, V)
    z_buf = buf()
    t_buf, p_buf = (buf(), buf()) if teacher is not None else (None, None)
    s_buf = buf() if teacher is not None and targets is not None else None
    # The gradient matmuls run in the head's dtype, but in float32 for a float16 head: its range ends at 6e-8, and
    # the 1/count-scaled terms fall below it before backward multiplies in grad_output (DeepSpeed's fp16 loss
    # scale), so loss scaling could not save them. bfloat16 has float32's range.
    mm = acc if student.weight.dtype == torch.float16 else student.weight.dtype
    w_mm = student.weight.to(mm) if needs[0] else None  # (V, C_s); a float32 copy for a float16 head only
    grad_h = torch.empty(student.hidden.shape, dtype=mm, device=dev) if needs[0] else None  # (M, C_s)
    grad_w = torch.zeros(student.weight.shape, dtype=acc, device=dev) if needs[1] else None  # (V, C_s)
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if needs[2] else None
    ce_sum = kd_sum = torch.zeros((), dtype=acc, device=dev)
    for start in range(0, m, chunk_size):
        rows = slice(start, start + chunk_size)
        n = min(chunk_size, m - start)
        z = student.logits_into(rows, z_buf[:n])  # (n, V)
        g = g_ce = row_scale = None
        if teacher is not None:
            z_t = teacher.logits_into(rows, t_buf[:n])  # (n, V)
            z_kd = z if s_buf is None else s_buf[:n].copy_(z)  # CE reads z after KD
            loss, g = _kd_chunk(z_kd, z_t, p_buf[:n], keep[rows], temperature, grad)
            kd_sum = kd_sum + loss
            row_scale = torch.where(keep[rows], temperature * kd_scale, 0.0)  # (n,)
        if targets is not None:
            loss, g_ce = _ce_chunk(z, targets[rows], grad)
            ce_sum = ce_sum + loss
            ce_rows = torch.where(targets[rows] != IGNORE, ce_scale, 0.0)  # (n,)
            if g is None:
                g, row_scale = g_ce, ce_rows
            elif grad:  # both: one (n, V) gradient, rows already scaled
                g = g.mul_(row_scale[:, None]).addcmul_(g_ce, ce_rows[:, None])
                row_scale = None
        if not grad:
            continue
        g_head = g.to(mm)  # (n, V) in the matmuls' dtype
        h = student.hidden[rows].to(mm)  # (n, C_s)
        scale = None if row_scale is None else row_scale[:, None].to(mm)  # (n, 1)
        if grad_h is not None:
            gh = torch.mm(g_head, w_mm, out=grad_h[rows])  # (n, C_s)
            if scale is not None:
                gh.mul_(scale)
        if grad_w is not None:
            hs = h if scale is None else h * scale  # (n, C_s)
            if g_head.dtype == acc:
                grad_w.addmm_(g_head.T, hs)  # (V, C_s), no temporary
            else:
                grad_w.add_(g_head.T @ hs)
        if grad_b is not None:
            grad_b.add_(g.sum(0) if row_scale is None else row_scale @ g)  # (V,)
    return (ce_sum, kd_sum), (grad_h, grad_w, grad_b)


class _FusedLinearLogitLoss(torch.autograd.Function):
    """Forward: the chunk loop (losses and gradients together). Backward: the kept gradients times grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, targets, keep, counts, weights, temperature,
                chunk_size):
        teacher = None if t_hidden is None else _Head(t_hidden, t_weight, t_bias)
        sums, grads = _chunk_loop(_Head(hidden, weight, bias), teacher, targets, keep, counts, weights,
                                  temperature=temperature, chunk_size=chunk_size, needs=tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ce, kd = (s / c for s, c in zip(sums, counts))  # the unweighted terms
        ctx.mark_non_differentiable(ce, kd)
        return weights[0] * ce + weights[1] * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        # A CPU grad_loss of 1 (no gradient accumulation; read without a device sync) leaves the kept gradients as
        # they are: no (V, C_s) product, which on a CPU costs a fresh 113 MB tensor for SmolLM2's head. Liger-Kernel's
        # fused linear cross-entropy skips it the same way but scales in place otherwise; a new product here keeps
        # a repeated backward (retain_graph, gradcheck) exact.
        one = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
        grads = [None if g is None else (g if one else g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, *[None] * 9)


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)}, head weight {tuple(weight.shape)}: expected (B, N, C), (V, C)")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        bias_dtype = None if bias is None else bias.dtype
        raise ValueError(f"{name}: hidden {hidden.dtype}, head weight {weight.dtype}, bias {bias_dtype}: expected one dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: head bias {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def _fused(name, hidden, weight, bias, teacher, input_ids, mask, *, ce_weight, kd_weight, temperature, chunk_size,
           reduction="mean", kd_mask=None) -> FusedLogitLosses:
    """Checks, causal shift and masks; then the autograd Function (or the bare loop when no gradient is wanted)."""
    _check_head(name, hidden, weight, bias)
    b, n, _ = hidden.shape
    kd_mask = mask if kd_mask is None else kd_mask
    if mask.shape != (b, n) or kd_mask.shape != (b, n) or (input_ids is not None and input_ids.shape != (b, n)):
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)}, mask {tuple(mask.shape)}, input_ids {shape}: "
                         "expected (B, N, C), (B, N), (B, N)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    if teacher is not None:
        if temperature <= 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        _check_head(name + " (teacher)", *teacher)
        t_hidden, t_weight, _ = teacher
        if t_hidden.shape[:2] != (b, n) or t_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: student hidden {tuple(hidden.shape)}, head {tuple(weight.shape)}; teacher hidden "
                             f"{tuple(t_hidden.shape)}, head {tuple(t_weight.shape)}: expected the same (B, N) and vocabulary V")
        t_bias = None if teacher.bias is None else teacher.bias.detach()
        teacher = _Head(t_hidden.detach().reshape(b * n, -1), t_weight.detach(), t_bias)  # (B*N, C_t), (V, C_t), (V,)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    one = torch.ones((), dtype=acc, device=hidden.device)
    targets = keep = None
    counts = [one, one]  # (ce, kd) divisors of the sums
    if input_ids is not None:  # position i predicts token i + 1 (causal_lm_loss); the last position predicts nothing
        shifted = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (B, N-1)
        targets = F.pad(shifted, (0, 1), value=IGNORE).reshape(-1)  # (B*N,)
        if reduction == "mean":
            counts[0] = (targets != IGNORE).sum().clamp(min=1).to(acc)
    if teacher is not None:  # KD on the kd_mask positions (every attended position by default, as logit_kd_loss)
        keep = kd_mask.bool().reshape(-1)  # (B*N,)
        counts[1] = keep.sum().clamp(min=1).to(acc)
    weights = (float(ce_weight), float(kd_weight))
    head = (hidden.reshape(b * n, -1), weight, bias)  # (B*N, C_s), (V, C_s), (V,)
    t_args = (None, None, None) if teacher is None else tuple(teacher)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        loss, ce, kd = _FusedLinearLogitLoss.apply(*head, *t_args, targets, keep, tuple(counts), weights,
                                                   float(temperature), chunk_size)
    else:  # values only: no gradient is formed
        with torch.no_grad():
            sums, _ = _chunk_loop(_Head(*head), teacher, targets, keep, counts, weights, temperature=float(temperature),
                                  chunk_size=chunk_size, needs=(False, False, False))
        ce, kd = (s / c for s, c in zip(sums, counts))
        loss = weights[0] * ce + weights[1] * kd
    return FusedLogitLosses(loss, ce if input_ids is not None else None, kd if teacher is not None else None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Next-token cross-entropy of the head ``hidden @ weight.T + bias``, chunk by chunk: equal to
    ``causal_lm_loss(hidden @ weight.T + bias, input_ids, mask, reduction)`` without its (B, N, V) logits.

    Position i predicts token i + 1; a target whose mask is 0 is not counted (the shift of transformers'
    ``ForCausalLMLoss``). Chunking: Liger-Kernel's fused linear losses, TRL's chunked distillation loss.

    Args:
        hidden: (B, N, C) the student's last hidden states (after the final norm: what the head reads).
        weight: (V, C) the LM head weight; bias: (V,) or None.
        input_ids: (B, N) token ids. mask: (B, N), 1 = real token.
        reduction: ``"mean"`` over counted targets or ``"sum"``.
        chunk_size: tokens (of the B * N) per chunk; memory about 4 x chunk_size x V floats (float32).

    Returns:
        Scalar in nats, float32 (float64 for float64 inputs). With no counted target, 0 with a zero
        gradient (``causal_lm_loss`` gives NaN there).

    Raises:
        ValueError: shapes disagree, ``chunk_size < 1`` or an unknown reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    return _fused("fused_linear_cross_entropy", hidden, weight, bias, None, input_ids, mask, ce_weight=1.0, kd_weight=0.0,
                  temperature=1.0, chunk_size=chunk_size, reduction=reduction).loss


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Logit KD ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per token, averaged over the tokens
    whose mask is 1, chunk by chunk: equal to ``logit_kd_loss(h_s @ W_s.T, h_t @ W_t.T, mask, temperature=T)``
    without either (B, N, V) logits.

    Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network" (T^2 keeps the gradient
    scale independent of T). Chunking: Liger-Kernel's fused linear distillation, TRL's chunked loss.

    Args:
        student_hidden: (B, N, C_s), student_weight: (V, C_s): the student's last hidden states and head.
        teacher_hidden: (B, N, C_t), teacher_weight: (V, C_t): the teacher's; no gradient reaches them.
        mask: (B, N), 1 = count the token (no shift: every attended position, as ``logit_kd_loss``).
        temperature: T > 0. student_bias, teacher_bias: (V,) or None.
        chunk_size: tokens per chunk; memory about 4 x chunk_size x V floats (float32).

    Returns:
        Scalar >= 0 (nats), float32 (float64 for float64 inputs); 0 with a zero gradient when the mask is empty.

    Raises:
        ValueError: ``temperature <= 0``, shapes or vocabularies disagree, ``chunk_size < 1``.
    """
    teacher = _Head(teacher_hidden, teacher_weight, teacher_bias)
    return _fused("fused_linear_kd", student_hidden, student_weight, student_bias, teacher, None, mask, ce_weight=0.0, kd_weight=1.0, temperature=temperature, chunk_size=chunk_size).loss


def fused_linear_ce_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kd_mask: torch.Tensor | None = None,
) -> FusedLogitLosses:
    """Next-token cross-entropy and logit KD in one chunk loop that computes each chunk's student logits
    once: ``loss = ce_weight * fused_linear_cross_entropy(...) + kd_weight * fused_linear_kd(...)``.

    The weights go in because the gradient is formed in the forward pass: one (V, C_s) gradient and two
    head matmuls per chunk serve both terms. A term with weight 0 is not computed (returned as None).

    Args:
        student_hidden (B, N, C_s), student_weight (V, C_s), teacher_hidden (B, N, C_t), teacher_weight
        (V, C_t), input_ids (B, N), mask (B, N), temperature, student_bias, teacher_bias, chunk_size: as in
        :func:`fused_linear_cross_entropy` and :func:`fused_linear_kd` (CE on the shifted targets, KD on
        every attended position). ce_weight, kd_weight: >= 0 floats, not both 0.

    Returns:
        :class:`FusedLogitLosses` ``(loss, ce, kd)``; ``loss`` carries the gradient, ``ce`` and ``kd``
        are the detached unweighted terms (nats, float32; float64 for float64 inputs).

    ``kd_mask`` (B, N): the positions KD reads, when they are not ``mask``'s (assistant-only loss: the
    positions whose next token is a counted target); ``mask`` then selects CE's targets alone.

    Raises:
        ValueError: a negative or both-zero weight, or as the two functions above.
    """
    if ce_weight < 0 or kd_weight < 0 or not (ce_weight or kd_weight):
        raise ValueError(f"fused_linear_ce_kd: weights must be >= 0 and not both 0, got ce {ce_weight}, kd {kd_weight}")
    teacher = _Head(teacher_hidden, teacher_weight, teacher_bias) if kd_weight else None
    return _fused("fused_linear_ce_kd", student_hidden, student_weight, student_bias, teacher, input_ids if ce_weight else None,
                  mask, ce_weight=float(ce_weight), kd_weight=float(kd_weight), temperature=temperature, chunk_size=chunk_size,
                  kd_mask=kd_mask)
