"""Cross-entropy task losses on a language-model head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "masked_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position i predicts token i + 1, padded targets ignored
    (the shift of transformers' ``ForCausalLMLoss``).

    Args:
        logits: (B, N, V). input_ids: (B, N). mask: (B, N), 1 = real token.
        reduction: ``"mean"`` over counted targets or ``"sum"``.

    Returns:
        float32 scalar (nats).
    """
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, N-1)
    flat_logits = logits[:, :-1].flatten(0, 1).float()  # (B * (N-1), V)
    return F.cross_entropy(flat_logits, targets.flatten(), ignore_index=-100, reduction=reduction)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Masked-LM cross-entropy over the masked positions (BERT, Devlin et al. 2019; labels -100 elsewhere,
    as transformers' ``DataCollatorForLanguageModeling`` writes them).

    Args:
        logits: (B, N, V). labels: (B, N), the original token at masked positions, -100 elsewhere.

    Returns:
        float32 scalar (nats); 0 for ``"mean"`` when nothing is masked.
    """
    flat = logits.flatten(0, 1).float()  # (B * N, V)
    loss = F.cross_entropy(flat, labels.flatten(), ignore_index=-100, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (labels != -100).sum().clamp(min=1)
