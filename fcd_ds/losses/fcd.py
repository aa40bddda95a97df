"""The FCD loss: Pearson correlation between student and teacher feature relations (FCD_SPEC steps 4-6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..runtime.distributed import all_gather_no_grad, all_gather_with_grad, global_sample_gram, world_size
from .correlation import mean_one_minus_rho, pearson_correlation
from .relations import NORM_EPS, SEQUENCE_RELATIONS, mean_pool, pooled_relation, sequence_correlation, token_correlation

__all__ = ["FCD_STACK_PAIRS", "FCDTerms", "fcd_terms", "fcd_pair_terms", "fcd_loss", "token_loss", "sequence_loss", "sampled_positions"]

FCD_STACK_PAIRS = {"auto": None, "true": True, "false": False}  # --fcd_stack_pairs -> fcd_pair_terms(stack=...)


class FCDTerms(NamedTuple):
    """Unweighted FCD terms of one layer pair, float32 scalars in [0, 2] ((*G,) for stacked pairs)."""

    token: torch.Tensor  # L_tok
    sequence: torch.Tensor  # L_seq


def _check(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> None:
    if h_s.dim() < 3 or h_t.dim() != h_s.dim() or h_s.shape[:-1] != h_t.shape[:-1] or mask.shape != h_s.shape[-3:-1]:
        raise ValueError(
            "fcd_loss: expected student (B, N, C_s), teacher (B, N, C_t) and mask (B, N) with the same B and N "
            f"(stacked pairs: (G, B, N, C) both); got {tuple(h_s.shape)}, {tuple(h_t.shape)}, {tuple(mask.shape)}"
        )


def sampled_positions(n: int, k: int | None, device=None) -> torch.Tensor | None:
    """``k`` evenly spaced positions of ``0..n-1``, the midpoints of k equal spans (``(2 i + 1) n // (2 k)`` for
    i < k: distinct), the subset the ``position`` sequence relation reads under ``positions=k``; ``None`` when
    ``k`` is ``None``/0 or ``k >= n`` (every position). The same on every rank for the same N. Midpoints, not
    ``i n // k``: that subset always holds position 0, whose features a causal LM makes alike in every sample
    (the first token's "attention sink"), and at small k it would weigh the relation's rows towards them.

    Raises: ValueError: ``k < 0``."""
    if k is not None and k < 0:
        raise ValueError(f"sequence_loss: positions must be >= 0 (0 = every position), got {k}")
    if not k or k >= n:
        return None
    return (2 * torch.arange(k, device=device) + 1) * n // (2 * k)  # (k,)


def _gather_samples(x: torch.Tensor, dim: int, grad: bool) -> torch.Tensor:
    """All-gather the sample dimension ``dim`` of ``x`` over the default process group (identity without one).
    (*G, B, ...) -> (*G, world * B, ...): the leading group dimensions are moved behind B for the gather."""
    gather = all_gather_with_grad if grad else all_gather_no_grad
    return gather(x.movedim(dim, 0)).movedim(0, dim)  # (B, *G, ...) -> (world * B, *G, ...) -> back


def _gram_sequence_correlation(g_s: torch.Tensor, g_t: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8):
    """:func:`~fcd_ds.losses.relations.sequence_correlation` from per-position Gram matrices instead of features.

    g_s, g_t: float32 (*G, N, B, B) (``global_sample_gram``); mask (B, N). The cosines are the Gram entries
    over the clamped norms (the square roots of its diagonal, clamped at 1e-6 as ``normalize_tokens``), the
    row means summed in float64 without autograd, the moments over the valid entries (d != b, both tokens
    real): the same formulas, so the same values to float rounding. Memory O(N * B^2) per model, all at once.
    Returns ``(rho (*G, B), counts (B,) bool)``."""
    m = mask.bool().t()  # (N, B)
    not_self = ~torch.eye(m.shape[1], dtype=torch.bool, device=m.device)
    valid = m[:, :, None] & m[:, None, :] & not_self  # (N, B, B)
    count = valid.double().sum((0, 2))  # (B,)
    xs = []
    for g in (g_s, g_t):
        inv = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=NORM_EPS**2).rsqrt()  # (*G, N, B): 1 / max(norm, 1e-6), finite gradient at 0
        rel = g * inv[..., :, None] * inv[..., None, :]  # (*G, N, B, B): cos(h[b, n], h[d, n])
        with torch.no_grad():
            mu = ((rel.double() * valid).sum((-3, -1)) / count.clamp(min=1.0)).float()  # (*G, B)
        xs.append((rel - mu[..., None, :, None]) * valid)
    xs, xt = xs
    cov, var_s, var_t = (xs * xt).sum((-3, -1)), (xs * xs).sum((-3, -1)), (xt * xt).sum((-3, -1))  # (*G, B)
    return cov / (var_s.clamp(min=1e-30).sqrt() * var_t.clamp(min=1e-30).sqrt() + eps), count >= 2


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
        h_s: (*G, B, N, C_s). h_t: (*G, B, N, C_t). mask: (B, N). Leading group dimensions G (stacked
            layer pairs) are independent losses computed together.
        chunk_size: rows of the N x N relation computed at once (see :func:`token_correlation`).
        global_batch: mean over the sequences of every data-parallel rank (each rank still computes
            only its own relations; two scalars per group are all-reduced).

    Returns:
        float32 (*G,) (a scalar for 3-D inputs) in [0, 2]; 0 with zero gradient when no sequence has 3 real tokens.
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
    positions: int | None = None,
) -> torch.Tensor:
    """L_seq = 1 - mean over samples of rho(row b of student, row b of teacher) (FCD_SPEC step 5).

    Args:
        h_s: (*G, B, N, C_s). h_t: (*G, B, N, C_t). mask: (B, N). Leading group dimensions G (stacked
            layer pairs) are independent losses computed together (samples related within their group).
        kind: ``"position"`` or ``"pooled"`` (see :func:`sequence_relation`).
        chunk_size: ``position`` only: positions of the (B, N, B) relation computed at once (see
            :func:`sequence_correlation`); ``None`` computes all positions at once.
        global_batch: relate the samples of every rank over the default process group, so every rank
            computes the loss of the global batch (same value as one process holding the whole batch);
            the student's gradient flows back to the rank that owns each sample. B and N must match
            across ranks. ``position``: the features are not all-gathered: :func:`global_sample_gram`
            moves each rank's features once (all_to_all) and all-reduces per-position Gram matrices, a
            (world * B)^2 * N float32 tensor per model held at once (``chunk_size`` does not apply);
            ``pooled``: the (B, C) pooled vectors are all-gathered.
        positions: ``position`` only: read the relation at ``positions`` evenly spaced positions
            (:func:`sampled_positions`) instead of all N, so each row holds ``positions * (B - 1)``
            entries; the features moved under ``global_batch`` and the O(N B^2 C) work shrink by
            ``positions / N``. An approximation of the spec's rows (FCD_SPEC step 3), which this
            project adds for many-rank runs (benchmarks/fcd_comm.py); ``None``/0: every position.

    Returns:
        float32 (*G,) (a scalar for 3-D inputs) in [0, 2]; 0 with zero gradient for a batch of 1 or rows
        with < 2 valid entries.
    """
    _check(h_s, h_t, mask)
    h_t = h_t.detach()
    if kind == "pooled":  # pool first: a global batch gathers (B, C) pooled vectors, not (B, N, C) features
        (p_s, has_token), (p_t, _) = mean_pool(h_s, mask), mean_pool(h_t, mask)  # (*G, B, C_s), (B,); (*G, B, C_t)
        if global_batch:
            p_s, p_t, has_token = _gather_samples(p_s, -2, True), _gather_samples(p_t, -2, False), all_gather_no_grad(has_token)
        rel_s, valid = pooled_relation(p_s, has_token)  # (*G, B, B), (B, B)
        rel_t, _ = pooled_relation(p_t, has_token)
        rho = pearson_correlation(rel_s, rel_t, valid.expand_as(rel_s))  # (*G, B)
        return mean_one_minus_rho(rho, valid.sum(-1) >= 2)
    if kind != "position":
        raise ValueError(f"sequence_loss: kind must be one of {SEQUENCE_RELATIONS}, got {kind!r}")
    idx = sampled_positions(mask.shape[-1], positions, mask.device)
    if idx is not None:  # (*G, B, N, C) -> (*G, B, K, C), mask (B, N) -> (B, K)
        h_s, h_t, mask = h_s.index_select(-2, idx), h_t.index_select(-2, idx), mask.index_select(-1, idx)
    if global_batch and world_size() > 1:  # (world * B)^2 * N Gram entries per model instead of (world * B) * N * C features
        mask = all_gather_no_grad(mask.to(torch.uint8))  # (world * B, N)
        g_s = global_sample_gram(h_s)  # (*G, N, world * B, world * B)
        with torch.no_grad():
            g_t = global_sample_gram(h_t)
        rho, counts = _gram_sequence_correlation(g_s, g_t, mask)  # (*G, world * B), (world * B,)
        return mean_one_minus_rho(rho, counts)
    rho, counts = sequence_correlation(h_s, h_t, mask, chunk_size=chunk_size)  # (*G, B), (B,)
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
    sequence_positions: int | None = None,
) -> FCDTerms:
    """Both unweighted FCD terms of one layer pair; a term whose weight is 0 is not computed (returns 0).

    See :func:`fcd_loss` for the arguments.
    """
    if sequence_relation not in SEQUENCE_RELATIONS:
        raise ValueError(f"fcd_loss: sequence_relation must be one of {SEQUENCE_RELATIONS}, got {sequence_relation!r}")
    zero = student_hidden.float().sum((-3, -2, -1)) * 0.0  # (*G,) 0 connected to the graph: zero gradient, no special case
    tok = (
        token_loss(student_hidden, teacher_hidden, attention_mask, chunk_size=chunk_size, global_batch=global_batch)
        if alpha
        else zero
    )
    seq = (
        sequence_loss(student_hidden, teacher_hidden, attention_mask, kind=sequence_relation, chunk_size=chunk_size,
                      global_batch=global_batch, positions=sequence_positions)
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
    sequence_positions: int | None = None,
) -> torch.Tensor:
    """FCD loss of one layer pair: ``alpha * L_tok + beta * L_seq`` (FCD_SPEC step 6).

    Huang, Guo, Wang, NeurIPS 2023; defaults alpha = beta = 1 as ``FCDLoss`` in alipay/POA
    poa/loss/fcd_loss.py, with padding masks, per-sample sequence rows and an optional global batch
    (FCD_SPEC.md). No projection: C_s and C_t may differ. All math in float32.

    Args:
        student_hidden: (B, N, C_s) output of a student block; (*G, B, N, C_s) for G stacked pairs, which
            returns one loss per pair, (*G,) (see :func:`fcd_pair_terms`).
        teacher_hidden: (B, N, C_t) output of the paired teacher block ((*G, B, N, C_t)); never receives gradient.
        attention_mask: (B, N), 1 for real tokens, 0 for padding; padded features never matter.
        alpha: weight of the token-level term. beta: weight of the sequence-level term.
        sequence_relation: ``"position"`` (default) or ``"pooled"``.
        global_batch: make the loss that of the global batch: the sequence term relates the samples of
            every data-parallel rank (see :func:`sequence_loss`), the token term averages over every
            rank's sequences.
        chunk_size: rows of the token relation, and positions of the ``position`` sequence relation, per
            block (memory bound for long sequences: O(B * chunk_size * N) and O(chunk_size * B^2));
            ``None``: one block each.
        sequence_positions: ``position`` relation read at this many evenly spaced positions
            (:func:`sequence_loss`'s ``positions``); ``None``/0: every position (the spec's relation).

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
        sequence_positions=sequence_positions,
    )
    return alpha * terms.token + beta * terms.sequence


def fcd_pair_terms(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    sequence_relation: str = "position",
    global_batch: bool = False,
    chunk_size: int | None = None,
    stack: bool | None = None,
    sequence_positions: int | None = None,
) -> list[FCDTerms]:
    """The FCD terms of several layer pairs, computed with the pairs stacked: one set of kernels per group.

    The same values as one :func:`fcd_terms` call per pair (the pairs are independent problems along a
    leading dimension), with a tenth of the operator calls for ten pairs: on a GPU a short-sequence FCD
    step is bound by kernel launches, not arithmetic. Pairs are stacked ``max(1, chunk_size // N)`` at a
    time, so that ``chunk_size`` still bounds the rows of token relation held at once across the group
    (a sequence longer than ``chunk_size`` is computed one pair at a time, in blocks, as before).
    Stacking copies each group's features once (``torch.stack``, and the position-major copies of the
    sequence relation's batched matmuls); the gradient reaches each student feature through the stack.
    On a CPU, which is not launch-bound, the larger stacked tensors fall out of cache: the same ten
    pairs (8 x 128 tokens, width 576) took 0.50 s stacked against 0.28-0.35 s one by one (forward and
    backward), so ``stack=None`` stacks on accelerators, and on CPUs only when the global batch spans
    several ranks: each group then costs one set of collectives instead of one per pair (6-7 per group),
    and at 4 CPU ranks x 4 pairs that took the step with the global batch on from 1.089x to 1.026x the step
    with it off (benchmarks/fcd_comm.py, RESULTS.md): the collectives' count, not their bytes, set the cost.

    Args:
        student_hiddens: P tensors (B, N, C_s), the student block outputs of the pairs, in pair order (a
            block may appear more than once). teacher_hiddens: P tensors (B, N, C_t), never receive gradient.
        attention_mask: (B, N). Other arguments as :func:`fcd_loss`.
        stack: stack the pairs (True), compute them one by one (False), or stack when the features are
            not on a CPU or ``global_batch`` spans several ranks (None).

    Returns:
        P :class:`FCDTerms` of float32 scalars, in pair order.

    Raises:
        ValueError: the lists are empty or differ in length, or the pairs' shapes differ within a model.
    """
    if not student_hiddens or len(student_hiddens) != len(teacher_hiddens):
        raise ValueError(f"fcd_pair_terms: expected as many student as teacher features (at least 1); "
                         f"got {len(student_hiddens)} and {len(teacher_hiddens)}")
    for name, hs in (("student", student_hiddens), ("teacher", teacher_hiddens)):
        if len({tuple(h.shape) for h in hs}) != 1:
            raise ValueError(f"fcd_pair_terms: every {name} feature must have one shape; got {[tuple(h.shape) for h in hs]}")
    n, pairs = attention_mask.shape[-1], len(student_hiddens)
    if stack is None:
        stack = student_hiddens[0].device.type != "cpu" or (global_batch and world_size() > 1)
    per_group = 1 if not stack else pairs if chunk_size is None else max(1, chunk_size // max(n, 1))
    options = dict(alpha=alpha, beta=beta, sequence_relation=sequence_relation, global_batch=global_batch, chunk_size=chunk_size,
                   sequence_positions=sequence_positions)
    out: list[FCDTerms] = []
    for start in range(0, pairs, per_group):
        group_s, group_t = student_hiddens[start : start + per_group], teacher_hiddens[start : start + per_group]
        if len(group_s) == 1:  # no copy for a group of one: (B, N, C_s), (B, N, C_t) -> scalar terms
            out.append(fcd_terms(group_s[0], group_t[0], attention_mask, **options))
            continue
        h_s = torch.stack(list(group_s))  # (G, B, N, C_s)
        h_t = torch.stack([h.detach() for h in group_t])  # (G, B, N, C_t)
        terms = fcd_terms(h_s, h_t, attention_mask, **options)  # (G,) terms
        out.extend(FCDTerms(tok, seq) for tok, seq in zip(terms.token.unbind(0), terms.sequence.unbind(0)))
    return out
