"""The FCD loss: Pearson correlation between student and teacher feature relations (FCD_SPEC steps 4-6)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..distributed import all_gather_no_grad, all_gather_with_grad
from .correlation import mean_one_minus_rho, pearson_correlation
from .relations import SEQUENCE_RELATIONS, mean_pool, pooled_relation, sequence_correlation, token_correlation

__all__ = ["FCDTerms", "fcd_terms", "fcd_loss", "token_loss", "sequence_loss"]


class FCDTerms(NamedTuple):
    """Unweighted FCD terms of one layer pair, float32 scalars in [0, 2]."""

    token: torch.Tensor  # L_tok
    sequence: torch.Tensor  # L_seq


def _check(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> None:
    if h_s.dim() != 3 or h_t.dim() != 3 or h_s.shape[:2] != h_t.shape[:2] or mask.shape != h_s.shape[:2]:
        raise ValueError(
            "fcd_loss: expected student (B, N, C_s), teacher (B, N, C_t) and mask (B, N) with the same "
            f"B and N; got {tuple(h_s.shape)}, {tuple(h_t.shape)}, {tuple(mask.shape)}"
        )


def token_loss(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    global_batch: bool = False,
) -> torch.Tensor:
    """L_tok = 1 - mean over sequences of rho(T_b^s, T_b^t) (FCD_SPEC step 5).

    Args:
        h_s: (B, N, C_s). h_t: (B, N, C_t). mask: (B, N).
        chunk_size: rows of the N x N relation computed at once (see :func:`token_correlation`).
        global_batch: mean over the sequences of every data-parallel rank (each rank still computes
            only its own relations; two scalars are all-reduced).

    Returns:
        float32 scalar in [0, 2]; 0 with zero gradient when no sequence has 3 real tokens.
    """
    _check(h_s, h_t, mask)
    rho, counts = token_correlation(h_s, h_t.detach(), mask, chunk_size=chunk_size)
    return mean_one_minus_rho(rho, counts, global_batch=global_batch)


def sequence_loss(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "position",
    chunk_size: int | None = None,
    global_batch: bool = False,
) -> torch.Tensor:
    """L_seq = 1 - mean over samples of rho(row b of student, row b of teacher) (FCD_SPEC step 5).

    Args:
        h_s: (B, N, C_s). h_t: (B, N, C_t). mask: (B, N).
        kind: ``"position"`` or ``"pooled"`` (see :func:`sequence_relation`).
        chunk_size: ``position`` only: positions of the (B, N, B) relation computed at once (see
            :func:`sequence_correlation`); ``None`` computes all positions at once.
        global_batch: all-gather features and masks over the default process group first, so every
            rank computes the loss of the global batch (same value as one process holding the whole
            batch); the student's gradient flows back to the rank that owns each sample. B and N must
            match across ranks.

    Returns:
        float32 scalar in [0, 2]; 0 with zero gradient for a batch of 1 or rows with < 2 valid entries.
    """
    _check(h_s, h_t, mask)
    h_t = h_t.detach()
    if kind == "pooled":  # pool first: a global batch gathers (B, C) pooled vectors, not (B, N, C) features
        (p_s, has_token), (p_t, _) = mean_pool(h_s, mask), mean_pool(h_t, mask)  # (B, C_s), (B,); (B, C_t)
        if global_batch:
            p_s, p_t, has_token = all_gather_with_grad(p_s), all_gather_no_grad(p_t), all_gather_no_grad(has_token)
        rel_s, valid = pooled_relation(p_s, has_token)  # (B, B), (B, B)
        rel_t, _ = pooled_relation(p_t, has_token)
        rho = pearson_correlation(rel_s, rel_t, valid)  # (B,)
        return mean_one_minus_rho(rho, valid.sum(-1) >= 2)
    if kind != "position":
        raise ValueError(f"sequence_loss: kind must be one of {SEQUENCE_RELATIONS}, got {kind!r}")
    if global_batch:
        h_s, h_t, mask = all_gather_with_grad(h_s), all_gather_no_grad(h_t), all_gather_no_grad(mask)
    rho, counts = sequence_correlation(h_s, h_t, mask, chunk_size=chunk_size)  # (B,), (B,)
    return mean_one_minus_rho(rho, counts)


def fcd_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sequence_relation: str = "position",
    global_batch: bool = False,
    chunk_size: int | None = None,
) -> FCDTerms:
    """Both unweighted FCD terms of one layer pair; a term whose weight is 0 is not computed (returns 0).

    See :func:`fcd_loss` for the arguments.
    """
    if sequence_relation not in SEQUENCE_RELATIONS:
        raise ValueError(f"fcd_loss: sequence_relation must be one of {SEQUENCE_RELATIONS}, got {sequence_relation!r}")
    zero = student_hidden.float().sum() * 0.0  # 0 connected to the graph: zero gradient, no special case
    tok = (
        token_loss(student_hidden, teacher_hidden, attention_mask, chunk_size=chunk_size, global_batch=global_batch)
        if alpha
        else zero
    )
    seq = (
        sequence_loss(student_hidden, teacher_hidden, attention_mask, kind=sequence_relation, chunk_size=chunk_size,
                      global_batch=global_batch)
        if beta
        else zero
    )
    return FCDTerms(tok, seq)


def fcd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sequence_relation: str = "position",
    global_batch: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """FCD loss of one layer pair: ``alpha * L_tok + beta * L_seq`` (FCD_SPEC step 6).

    Huang, Guo, Wang, NeurIPS 2023; defaults alpha = beta = 1 as ``FCDLoss`` in alipay/POA
    poa/loss/fcd_loss.py, with padding masks, per-sample sequence rows and an optional global batch
    (FCD_SPEC.md). No projection: C_s and C_t may differ. All math in float32.

    Args:
        student_hidden: (B, N, C_s) output of a student block.
        teacher_hidden: (B, N, C_t) output of the paired teacher block; never receives gradient.
        attention_mask: (B, N), 1 for real tokens, 0 for padding; padded features never matter.
        alpha: weight of the token-level term. beta: weight of the sequence-level term.
        sequence_relation: ``"position"`` (default) or ``"pooled"``.
        global_batch: make the loss that of the global batch: the sequence term all-gathers features
            over data-parallel ranks, the token term averages over every rank's sequences.
        chunk_size: rows of the token relation, and positions of the ``position`` sequence relation, per
            block (memory bound for long sequences: O(B * chunk_size * N) and O(chunk_size * B^2));
            ``None``: one block each.

    Returns:
        float32 scalar, in [0, 2 * (alpha + beta)]; 0 when student and teacher relations are equal
        (e.g. ``h_s = h_t @ Q`` with Q orthogonal, or token vectors rescaled).

    Raises:
        ValueError: shapes disagree or ``sequence_relation`` is unknown.
    """
    terms = fcd_terms(
        student_hidden,
        teacher_hidden,
        attention_mask,
        alpha=alpha,
        beta=beta,
        sequence_relation=sequence_relation,
        global_batch=global_batch,
        chunk_size=chunk_size,
    )
    return alpha * terms.token + beta * terms.sequence
