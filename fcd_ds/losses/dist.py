"""DIST: inter- and intra-class Pearson relations of predicted distributions (Tao Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch

from .correlation import pearson_correlation

__all__ = ["dist_loss"]


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> torch.Tensor:
    """DIST, "Knowledge Distillation from A Stronger Teacher" (Huang, You, Wang, Qian, Xu; NeurIPS 2022), eq. 6-8.

    With ``Y = softmax(Z / T)`` over the classes for every sample (a token of a language model, a sequence
    of a classifier):

    * inter-class relation: ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (each sample's distribution over classes);
    * intra-class relation: ``1 - mean_c rho(Y_s[:, c], Y_t[:, c])`` (each class over the samples);

    loss ``= T^2 * (inter_weight * inter + intra_weight * intra)``, rho the Pearson correlation
    (:func:`~fcd_ds.losses.pearson_correlation`, eps 1e-8, as DIST's reference code). The paper's defaults
    are T = 1 and weights 1. Computed in float32; only samples with ``mask`` 1 take part.

    Args:
        student_logits: (B, C) or (B, N, C). teacher_logits: same shape, no gradient.
        mask: None, or (B,) / (B, N) with 1 = a sample that counts (real, non-padding tokens).
        temperature: T > 0.

    Returns:
        float32 scalar in [0, 2 * T^2 * (inter_weight + intra_weight)]; 0 when fewer than 2 samples count.

    Raises:
        ValueError: shapes disagree or ``temperature <= 0``.
    """
    if temperature <= 0:
        raise ValueError(f"dist_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or (mask is not None and mask.shape != student_logits.shape[:-1]):
        raise ValueError(
            f"dist_loss: logits {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}, mask "
            f"{None if mask is None else tuple(mask.shape)}: expected (..., C), (..., C), (...)"
        )
    z_s = student_logits.reshape(-1, student_logits.shape[-1])  # (S, C): every sample, flattened
    z_t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()  # (S,)
        z_s, z_t = z_s[keep], z_t[keep]  # (S', C)
    if z_s.shape[0] < 2:
        return student_logits.float().sum() * 0.0
    y_s = torch.softmax(z_s.float() / temperature, dim=-1)  # (S', C)
    y_t = torch.softmax(z_t.float() / temperature, dim=-1)
    inter = 1.0 - pearson_correlation(y_s, y_t).mean()
    intra = 1.0 - pearson_correlation(y_s.t(), y_t.t()).mean()  # (C, S'): each class over the samples
    return temperature**2 * (inter_weight * inter + intra_weight * intra)
