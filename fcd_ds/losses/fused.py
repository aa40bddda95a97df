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
float32 accumulation inside the matmul); softmaxes, losses and the gradient sums over chunks run in
float32 (float64 for float64 inputs). Heads that do more than ``h @ W.T + b`` (logit soft-capping,
logit scaling) are not covered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CHUNK_SIZE", "FusedLogitLosses", "fused_linear_ce_kd", "fused_linear_cross_entropy", "fused_linear_kd"]

DEFAULT_CHUNK_SIZE = 256  # tokens per chunk: TRL's size; a (256, 49152) float32 chunk is 48 MiB
IGNORE = -100


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

    def logits(self, rows: slice, acc: torch.dtype) -> torch.Tensor:
        z = (self.hidden[rows] @ self.weight.T).to(acc)  # (n, V)
        return z if self.bias is None else z.add_(self.bias)


def _ce_chunk(z: torch.Tensor, target: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over the chunk's counted rows, and ``scale`` times its gradient
    w.r.t. the logits. z: (n, V), consumed; target: (n,), IGNORE = not counted; scale: scalar."""
    valid = target != IGNORE  # (n,)
    safe = target.clamp(min=0)[:, None]  # (n, 1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    loss = torch.where(valid, (lse - z.gather(1, safe))[:, 0], 0.0).sum()
    grad = z.sub_(lse).exp_()  # softmax, (n, V)
    grad.scatter_add_(1, safe, torch.full_like(lse, -1.0))  # softmax - one_hot(target)
    return loss, grad.mul_(torch.where(valid, scale, 0.0)[:, None])


def _kd_chunk(z_s: torch.Tensor, z_t: torch.Tensor, keep: torch.Tensor, temperature: float, scale):
    """Sum over the chunk's kept rows of ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (the ops of
    :func:`logit_kd_loss`), and ``scale`` times its gradient w.r.t. z_s, ``T (softmax(z_s/T) - p_t)``.
    z_s, z_t: (n, V), z_t consumed; keep: (n,) bool."""
    log_p_t = F.log_softmax(z_t.div_(temperature), dim=-1)  # (n, V)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    p_t = log_p_t.exp()
    kl = log_p_t.sub_(log_p_s).mul_(p_t).sum(-1)  # (n,)
    loss = temperature**2 * torch.where(keep, kl, 0.0).sum()
    grad = log_p_s.exp_().sub_(p_t)  # (n, V)
    return loss, grad.mul_(torch.where(keep, temperature * scale, 0.0)[:, None])


def _chunk_loop(student: _Head, teacher: _Head | None, targets, keep, counts, weights, *, temperature: float,
                chunk_size: int, needs: tuple[bool, bool, bool]):
    """Loss sums ``(ce_sum, kd_sum)`` over all tokens and, for ``needs = (hidden, weight, bias)``, the gradients
    of ``ce_weight * ce_sum / ce_count + kd_weight * kd_sum / kd_count`` (float32 sums over chunks).
    targets: (M,) or None (no CE); keep: (M,) bool or None (no KD); counts, weights: (ce, kd) pairs."""
    acc = torch.promote_types(student.hidden.dtype, torch.float32)
    m, vocab = student.hidden.shape[0], student.weight.shape[0]
    ce_scale, kd_scale = (w / c for w, c in zip(weights, counts))
    grad_h = torch.empty_like(student.hidden) if needs[0] else None  # (M, C_s)
    grad_w = torch.zeros(student.weight.shape, dtype=acc, device=student.weight.device) if needs[1] else None
    grad_b = torch.zeros(vocab, dtype=acc, device=student.weight.device) if needs[2] else None
    ce_sum = kd_sum = torch.zeros((), dtype=acc, device=student.hidden.device)
    for start in range(0, m, chunk_size):
        rows = slice(start, start + chunk_size)
        z = student.logits(rows, acc)  # (n, V)
        grad_z = None
        if teacher is not None:
            with torch.no_grad():
                z_t = teacher.logits(rows, acc)  # (n, V)
            loss, grad_z = _kd_chunk(z, z_t, keep[rows], temperature, kd_scale)
            kd_sum = kd_sum + loss
            del z_t
        if targets is not None:
            loss, g = _ce_chunk(z, targets[rows], ce_scale)  # consumes z
            ce_sum = ce_sum + loss
            grad_z = g if grad_z is None else grad_z.add_(g)
        del z
        if not any(needs):
            continue
        g = grad_z.to(student.weight.dtype)  # (n, V) in the head's dtype for its matmuls
        if grad_h is not None:
            grad_h[rows] = g @ student.weight  # (n, C_s)
        if grad_w is not None and g.dtype == acc:
            grad_w.addmm_(g.T, student.hidden[rows])  # (V, C_s), no temporary
        elif grad_w is not None:
            grad_w.add_(g.T @ student.hidden[rows])
        if grad_b is not None:
            grad_b.add_(grad_z.sum(0))
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
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
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
           reduction="mean") -> FusedLogitLosses:
    """Checks, causal shift and masks; then the autograd Function (or the bare loop when no gradient is wanted)."""
    _check_head(name, hidden, weight, bias)
    b, n, _ = hidden.shape
    if mask.shape != (b, n) or (input_ids is not None and input_ids.shape != (b, n)):
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
    if teacher is not None:  # KD on every attended position (logit_kd_loss)
        keep = mask.bool().reshape(-1)  # (B*N,)
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
        chunk_size: tokens (of the B * N) per chunk; memory about 6 x chunk_size x V floats.

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
        chunk_size: tokens per chunk; memory about 6 x chunk_size x V floats.

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

    Raises:
        ValueError: a negative or both-zero weight, or as the two functions above.
    """
    if ce_weight < 0 or kd_weight < 0 or not (ce_weight or kd_weight):
        raise ValueError(f"fused_linear_ce_kd: weights must be >= 0 and not both 0, got ce {ce_weight}, kd {kd_weight}")
    teacher = _Head(teacher_hidden, teacher_weight, teacher_bias) if kd_weight else None
    return _fused("fused_linear_ce_kd", student_hidden, student_weight, student_bias, teacher, input_ids if ce_weight else None,
                  mask, ce_weight=float(ce_weight), kd_weight=float(kd_weight), temperature=temperature, chunk_size=chunk_size)
