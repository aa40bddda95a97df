"""Distillation losses as pure functions ``(student, teacher, mask, **options) -> scalar``."""

from .correlation import mean_one_minus_rho, pearson_correlation
from .dist import dist_loss
from .fcd import FCD_STACK_PAIRS, FCDTerms, fcd_loss, fcd_pair_terms, fcd_terms, sequence_loss, token_loss
from .fused import FusedLogitLosses, fused_linear_ce_kd, fused_linear_cross_entropy, fused_linear_kd
from .hidden_mse import hidden_mse_loss
from .kd import logit_kd_loss
from .lm import causal_lm_loss, masked_lm_loss
from .minilm import attention_relation, minilm_loss, relation_kl
from .relations import (
    SEQUENCE_RELATIONS,
    normalize_tokens,
    sequence_correlation,
    sequence_relation,
    token_correlation,
    token_relation,
)

__all__ = [
    "FCD_STACK_PAIRS",
    "FCDTerms",
    "FusedLogitLosses",
    "SEQUENCE_RELATIONS",
    "attention_relation",
    "causal_lm_loss",
    "dist_loss",
    "fcd_loss",
    "fcd_terms",
    "fcd_pair_terms",
    "fused_linear_ce_kd",
    "fused_linear_cross_entropy",
    "fused_linear_kd",
    "hidden_mse_loss",
    "logit_kd_loss",
    "masked_lm_loss",
    "mean_one_minus_rho",
    "minilm_loss",
    "normalize_tokens",
    "pearson_correlation",
    "relation_kl",
    "sequence_correlation",
    "sequence_loss",
    "sequence_relation",
    "token_correlation",
    "token_loss",
    "token_relation",
]
