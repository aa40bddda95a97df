"""The learned projection of hidden-state MSE: student width -> teacher width (TinyBERT's ``W_h``).

It trains with the student: :func:`attach_hidden_projection` registers it as a submodule of the student
model before ``deepspeed.initialize``, so the optimizer, ZeRO partitioning and DeepSpeed checkpoints
include it like any student parameter; :func:`export_state_dict` leaves it out of the exported model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PROJECTION_ATTR", "attach_hidden_projection", "hidden_projection", "export_state_dict"]

PROJECTION_ATTR = "fcd_ds_hidden_projection"


def attach_hidden_projection(model: nn.Module, student_width: int, teacher_width: int) -> nn.Module | None:
    """Register ``nn.Linear(student_width, teacher_width)`` (with bias, PyTorch's default init, as
    TinyBERT's ``fit_dense``) on ``model`` under :data:`PROJECTION_ATTR`, one shared by every layer pair
    (TinyBERT eq. 5). Equal widths need none: returns None and registers nothing.

    Returns:
        The projection, or None.
    """
    if student_width == teacher_width:
        return None
    projection = nn.Linear(student_width, teacher_width).to(next(model.parameters()).dtype)
    model.add_module(PROJECTION_ATTR, projection)
    return projection


def hidden_projection(model: nn.Module) -> nn.Module | None:
    """The projection registered on ``model``, or None."""
    return getattr(model, PROJECTION_ATTR, None)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the training-only projection (cloned, detached tensors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(PROJECTION_ATTR + ".")}
