"""Hidden-state MSE between matched transformer blocks (TinyBERT, BERT-PKD)."""

from __future__ import annotations

import torch

__all__ = ["hidden_mse_loss"]


def hidden_mse_loss(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's (projected) and the teacher's block outputs, over real tokens.

    TinyBERT (Jiao et al., 2020, eq. 5: ``MSE(H^S W_h, H^T)``) and BERT-PKD (Sun et al., 2019) match
    hidden states exactly; when the widths differ the caller first maps the student's features through
    the learned projection ``W_h`` (:class:`~fcd_ds.projections.HiddenProjections`). Averaged over real
    tokens and channels (padding excluded), in float32.

    Args:
        h_s: (B, N, C) student features, already projected to the teacher's width C.
        h_t: (B, N, C) teacher features (no gradient flows into them).
        mask: (B, N), 1 = real token.

    Returns:
        float32 scalar >= 0; 0 with zero gradient when the mask is empty.

    Raises:
        ValueError: shapes disagree (e.g. the widths differ and no projection was applied).
    """
    if h_s.shape != h_t.shape or mask.shape != h_s.shape[:2]:
        raise ValueError(
            f"hidden_mse_loss: student {tuple(h_s.shape)}, teacher {tuple(h_t.shape)}, mask {tuple(mask.shape)}: "
            "expected (B, N, C), (B, N, C), (B, N); project the student to the teacher's width first"
        )
    keep = mask.bool().unsqueeze(-1)  # (B, N, 1)
    sq = torch.where(keep, (h_s.float() - h_t.detach().float()).pow(2), 0.0)  # (B, N, C); where, not *: padding may hold inf
    return sq.sum() / (keep.sum() * h_s.shape[-1]).clamp(min=1.0)
