"""Classic logit knowledge distillation (Hinton, Vinyals, Dean, 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["logit_kd_loss"]


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 2.0,
) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per token, averaged over real tokens.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (the T^2 factor keeps gradient
    scale independent of T); same form as torchtune's ``ForwardKLLoss`` with temperature.

    Args:
        student_logits: (B, N, V). teacher_logits: (B, N, V), no gradient. mask: (B, N), 1 = count token.
        temperature: T > 0.

    Returns:
        float32 scalar >= 0; 0 (zero gradient) when the mask is empty.

    Raises:
        ValueError: ``temperature <= 0`` or shapes disagree.
    """
    if temperature <= 0:
        raise ValueError(f"logit_kd_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"logit_kd_loss: logits {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}, "
            f"mask {tuple(mask.shape)}: expected (B, N, V), (B, N, V), (B, N)"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, N, V)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, N)
    keep = mask.bool()
    return temperature**2 * torch.where(keep, kl, 0.0).sum() / keep.sum().clamp(min=1)
