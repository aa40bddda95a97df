"""Masked Pearson correlation and the ``1 - rho`` loss built on it."""

from __future__ import annotations

import torch

from ..runtime.distributed import all_reduce_with_grad

__all__ = ["pearson_correlation", "mean_one_minus_rho"]

# Floor under a sum of squares before the square root: keeps the gradient finite (0 instead of NaN)
# for a constant vector, and is far below any variance a real relation row has.
_TINY = 1e-30


def pearson_correlation(
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` along the last dimension, over valid entries only.

    ``rho(x, y) = <x - mean(x), y - mean(y)> / (||x - mean(x)|| * ||y - mean(y)|| + eps)``, the means
    and sums taken over the entries where ``valid`` is true (FCD_SPEC step 4; the same correlation as
    DIST, Tao Huang et al., NeurIPS 2022, eq. 3, and ``pearson_correlation`` in alipay/POA
    poa/loss/fcd_loss.py, which has no mask). Computed in float32 whatever the input dtype.

    Args:
        x, y: (..., M) tensors of the same shape.
        valid: optional (..., M) bool mask; ``None`` means every entry is valid.
        eps: added to the denominator.

    Returns:
        (...,) float32 tensor in [-1, 1]. A row with fewer than 2 valid entries, or a constant row, gives
        0 (never NaN) with a finite gradient; callers decide whether such a row counts (see
        :func:`mean_one_minus_rho`).

    Raises:
        ValueError: shapes of ``x``, ``y`` and ``valid`` differ.
    """
    if x.shape != y.shape or (valid is not None and valid.shape != x.shape):
        raise ValueError(
            f"pearson_correlation: x {tuple(x.shape)}, y {tuple(y.shape)} and valid "
            f"{None if valid is None else tuple(valid.shape)} must have the same shape"
        )
    x = x.float()
    y = y.float()
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    w = valid.float()
    count = w.sum(-1, keepdim=True).clamp(min=1.0)  # (..., 1)
    xc = (x - (x * w).sum(-1, keepdim=True) / count) * w  # (..., M), zero off the valid set
    yc = (y - (y * w).sum(-1, keepdim=True) / count) * w
    cov = (xc * yc).sum(-1)
    x_norm = (xc * xc).sum(-1).clamp(min=_TINY).sqrt()
    y_norm = (yc * yc).sum(-1).clamp(min=_TINY).sqrt()
    return cov / (x_norm * y_norm + eps)


def mean_one_minus_rho(rho: torch.Tensor, counts: torch.Tensor, *, global_batch: bool = False) -> torch.Tensor:
    """``1 - mean(rho)`` over the rows that count (FCD_SPEC step 5), 0 with zero gradient if none do.

    Args:
        rho: (*G, R) correlations; leading dimensions G (e.g. stacked layer pairs) are kept.
        counts: (R,) or (*G, R) bool, true where the row has enough valid entries to count.
        global_batch: average over the rows of every data-parallel rank (each rank's two sums added by
            a differentiable all_reduce, so that DeepSpeed's gradient averaging yields the global-batch
            gradient).

    Returns:
        float32 (*G,) (a scalar for 1-D ``rho``) in [0, 2].
    """
    w = counts.float().expand_as(rho)  # (*G, R)
    sums = torch.stack([(w * (1.0 - rho)).sum(-1), w.sum(-1)], -1)  # (*G, 2): sum of 1 - rho, rows counted
    if global_batch:
        sums = all_reduce_with_grad(sums)  # (*G, 2) summed over ranks
    return sums[..., 0] / sums[..., 1].clamp(min=1.0)
