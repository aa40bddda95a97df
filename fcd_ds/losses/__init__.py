"""Distillation losses as pure functions ``(student, teacher, mask, **options) -> scalar``."""

from .correlation import mean_one_minus_rho, pearson_correlation
from .fcd import FCDTerms, fcd_loss, fcd_terms, sequence_loss, token_loss
from .kd import logit_kd_loss
from .lm import causal_lm_loss, masked_lm_loss
from .relations import SEQUENCE_RELATIONS, normalize_tokens, sequence_relation, token_correlation, token_relation

__all__ = [
    "FCDTerms",
    "SEQUENCE_RELATIONS",
    "causal_lm_loss",
    "fcd_loss",
    "fcd_terms",
    "logit_kd_loss",
    "masked_lm_loss",
    "mean_one_minus_rho",
    "normalize_tokens",
    "pearson_correlation",
    "sequence_loss",
    "sequence_relation",
    "token_correlation",
    "token_loss",
    "token_relation",
]
