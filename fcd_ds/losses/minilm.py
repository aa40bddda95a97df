"""MiniLMv2 multi-head self-attention relation distillation (Wang et al., Findings of ACL 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_relation", "relation_kl", "minilm_loss"]


def attention_relation(x: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Log of MiniLMv2's self-attention relation of one vector kind (queries, keys or values).

    The C channels are split into ``num_heads`` relation heads of d = C / num_heads channels (MiniLMv2 §3.1:
    the concatenated attention heads re-split into A_r heads, so teacher and student need not have the
    same number of attention heads); ``R_a = softmax(X_a X_a^T / sqrt(d))`` over the keys, padding keys
    masked out.

    Args:
        x: (B, N, C) one kind of attention vectors of one block (before any rotary embedding).
        mask: (B, N), 1 = real token.
        num_heads: relation heads; must divide C.

    Returns:
        (B, H, N, N) float32 log-probabilities over the last (key) dimension.

    Raises:
        ValueError: ``num_heads`` does not divide C.
    """
    b, n, c = x.shape
    if num_heads < 1 or c % num_heads:
        raise ValueError(f"attention_relation: {num_heads} relation heads do not divide the width {c}")
    d = c // num_heads
    xh = x.float().view(b, n, num_heads, d).transpose(1, 2)  # (B, H, N, d)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d)  # (B, H, N, N)
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, N)
    scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(log_r_s: torch.Tensor, log_r_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(R_t || R_s)`` per query row, averaged over relation heads and real query tokens.

    Args:
        log_r_s, log_r_t: (B, H, N, N) log-relations from :func:`attention_relation` (teacher without gradient).
        mask: (B, N), 1 = real token.

    Returns:
        float32 scalar >= 0.
    """
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, N)
    p_t = log_r_t.exp()
    kl = (p_t * (log_r_t - log_r_s)).masked_fill(~keys, 0.0).sum(-1)  # (B, H, N): KL of each query row
    queries = mask.bool()[:, None, :]  # (B, 1, N): real queries only
    return torch.where(queries, kl, 0.0).sum() / (queries.sum() * kl.shape[1]).clamp(min=1.0)


def minilm_loss(
    student_qkv: Sequence[torch.Tensor],
    teacher_qkv: Sequence[torch.Tensor],
    mask: torch.Tensor,
    *,
    num_heads: int,
) -> torch.Tensor:
    """MiniLMv2's loss: ``KL_QQ + KL_KK + KL_VV`` between teacher and student relations (MiniLMv2 eq. 5).

    Each kind is split into the same ``num_heads`` relation heads in both models, so the widths (and
    the attention head counts) of student and teacher may differ; models with grouped key/value heads
    (Llama-style GQA) have narrower keys and values than queries, and ``num_heads`` must divide every width.

    Args:
        student_qkv: (queries, keys, values), each (B, N, C_s_kind). teacher_qkv: the teacher's, each
            (B, N, C_t_kind), no gradient. mask: (B, N), 1 = real token (padding is neither query nor key).
        num_heads: relation heads.

    Returns:
        float32 scalar >= 0; 0 when the student's relations equal the teacher's.

    Raises:
        ValueError: not three kinds per model, batch shapes differ, or ``num_heads`` divides no width.
    """
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError("minilm_loss: expected (queries, keys, values) for student and teacher")
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for x_s, x_t in zip(student_qkv, teacher_qkv):
        if x_s.shape[:2] != x_t.shape[:2] or x_s.shape[:2] != mask.shape:
            raise ValueError(
                f"minilm_loss: student {tuple(x_s.shape)}, teacher {tuple(x_t.shape)}, mask {tuple(mask.shape)}: "
                "expected (B, N, C_s), (B, N, C_t), (B, N)"
            )
        log_r_t = attention_relation(x_t.detach(), mask, num_heads)
        total = total + relation_kl(attention_relation(x_s, mask, num_heads), log_r_t, mask)
    return total
