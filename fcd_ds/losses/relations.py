"""Token-level and sequence-level feature relations of FCD (FCD_SPEC steps 1-3).

Both relations are cosine matrices, so a student of width C_s is compared with a teacher of width C_t
without any projection layer. Sources: Huang, Guo, Wang, "Towards Efficient Pre-Trained Language Model
via Feature Correlation Distillation", NeurIPS 2023; ``FCDLoss`` in alipay/POA poa/loss/fcd_loss.py
(no masks, keeps diagonals, chunks the (N, B, B) tensor differently: this module follows FCD_SPEC.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "normalize_tokens",
    "token_relation",
    "token_correlation",
    "sequence_relation",
    "mean_pool",
    "pooled_relation",
    "sequence_correlation",
    "SEQUENCE_RELATIONS",
]

SEQUENCE_RELATIONS = ("position", "pooled")
NORM_EPS = 1e-6


def normalize_tokens(h: torch.Tensor) -> torch.Tensor:
    """``h / max(||h||_2, 1e-6)`` along the last (feature) dimension, in float32. (B, N, C) -> (B, N, C)."""
    return F.normalize(h.float(), p=2.0, dim=-1, eps=NORM_EPS)


def token_relation(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-to-token cosine matrix of every sequence, materialised (reference form, O(B N^2) memory).

    Args:
        h: (B, N, C) block output features.
        mask: (B, N) attention mask, nonzero for real tokens.

    Returns:
        ``(T, valid)``: T (B, N, N) float32 with ``T[b, i, j] = cos(h[b, i], h[b, j])``; valid (B, N, N)
        bool, true where ``i != j`` and both tokens are real (FCD_SPEC step 2).
    """
    hn = normalize_tokens(h)  # (B, N, C)
    rel = hn @ hn.transpose(1, 2)  # (B, N, N)
    m = mask.bool()
    eye = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
    valid = m[:, :, None] & m[:, None, :] & ~eye  # (B, N, N)
    return rel, valid


def _masked_offdiag_mean(hn: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``hn_i . hn_j`` over valid i != j without forming the matrix. (*G, B, N, C), mask (B, N) -> (*G, B).

    sum_{i != j} hn_i . hn_j = ||sum_i hn_i||^2 - sum_i ||hn_i||^2 (sums over valid tokens); float64 sums.
    """
    hv = hn.double() * m[..., None]  # (*G, B, N, C)
    total = hv.sum(-2).pow(2).sum(-1) - hv.pow(2).sum((-2, -1))  # (*G, B)
    n = m.double().sum(1)  # (B,)
    return (total / (n * (n - 1)).clamp(min=1.0)).float()


def _chunk_moments(hs, ht, m, mu_s, mu_t, start: int, stop: int):
    """Centered second moments of rows ``start:stop`` of both token relations. Returns three (*G, B) tensors."""
    rs = hs[..., start:stop, :] @ hs.transpose(-1, -2)  # (*G, B, R, N)
    rt = ht[..., start:stop, :] @ ht.transpose(-1, -2)  # (*G, B, R, N)
    rows = torch.arange(start, stop, device=hs.device)[:, None]
    cols = torch.arange(hs.shape[-2], device=hs.device)[None, :]
    valid = (m[:, start:stop, None] & m[:, None, :] & (rows != cols)).float()  # (B, R, N), shared by the groups
    xs = (rs - mu_s[..., None, None]) * valid
    xt = (rt - mu_t[..., None, None]) * valid
    return (xs * xt).sum((-2, -1)), (xs * xs).sum((-2, -1)), (xt * xt).sum((-2, -1))


def _blocked_correlation(moments, hs, ht, m, mu_s, mu_t, chunk_size: int | None, eps: float) -> torch.Tensor:
    """Pearson correlation from centered moments summed over blocks of positions ``0:N`` (*G, B).

    ``moments(hs, ht, m, mu_s, mu_t, start, stop)`` returns the (*G, B) sums of ``x_s * x_t``, ``x_s^2`` and
    ``x_t^2`` (x centered by mu, zero off the valid set) over the entries of positions ``start:stop``.
    With autograd on and more than one block, each block is recomputed in backward (activation
    checkpointing), so only one block's intermediates live at a time.
    """
    n = hs.shape[-2]
    step = n if chunk_size is None or chunk_size >= n else chunk_size
    cov = var_s = var_t = 0.0
    for start in range(0, n, step):
        args = (hs, ht, m, mu_s, mu_t, start, min(start + step, n))
        if step < n and torch.is_grad_enabled() and hs.requires_grad:
            c, vs, vt = checkpoint(moments, *args, use_reentrant=False)
        else:
            c, vs, vt = moments(*args)
        cov, var_s, var_t = cov + c, var_s + vs, var_t + vt
    return cov / (var_s.clamp(min=1e-30).sqrt() * var_t.clamp(min=1e-30).sqrt() + eps)


def token_correlation(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence Pearson correlation of student and teacher token relations, without storing N x N.

    Equal (to float rounding) to ``pearson_correlation(T_s, T_t, valid)`` with the matrices of
    :func:`token_relation` flattened per sequence, but the means come in closed form and the centered
    moments are summed over blocks of ``chunk_size`` rows; with autograd on, each block is
    recomputed in backward (activation checkpointing), so memory is O(B * chunk_size * N) instead of
    O(B * N^2) per model (FCD_SPEC "Cost": N = 4096, B = 8 would need 512 MiB per matrix).

    Args:
        h_s: (*G, B, N, C_s) student features. h_t: (*G, B, N, C_t) teacher features (no gradient needed).
            Optional leading group dimensions G (e.g. stacked layer pairs) are independent problems
            computed together, sharing the mask.
        mask: (B, N) attention mask.
        chunk_size: rows per block; ``None`` or >= N computes all rows at once.
        eps: added to the correlation's denominator.

    Returns:
        ``(rho, counts)``: rho (*G, B) float32; counts (B,) bool, true for sequences with >= 3 real tokens
        (FCD_SPEC: fewer than 2 distinct pairs contribute nothing).
    """
    m = mask.bool()
    hs, ht = normalize_tokens(h_s), normalize_tokens(h_t)  # (*G, B, N, C_s), (*G, B, N, C_t)
    mu_s, mu_t = _masked_offdiag_mean(hs, m), _masked_offdiag_mean(ht, m)  # (*G, B)
    rho = _blocked_correlation(_chunk_moments, hs, ht, m, mu_s, mu_t, chunk_size, eps)
    return rho, m.sum(1) >= 3


def sequence_relation(
    h: torch.Tensor, mask: torch.Tensor, kind: str = "position"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-to-sample cosine relation within the batch, one row per sample (FCD_SPEC step 3), materialised.

    ``position`` is the reference form (O(B^2 N) memory): the loss uses :func:`sequence_correlation`,
    which streams over blocks of positions.

    Args:
        h: (B, N, C) block output features.
        mask: (B, N) attention mask.
        kind: ``"position"``: row b holds ``cos(h[b, n], h[b', n])`` for every position n and every other
            sample b', valid where both tokens are real; ``"pooled"``: mean-pool real tokens per sample,
            row b holds ``cos(p_b, p_b')`` for b' != b (both samples having a real token).

    Returns:
        ``(R, valid)``: ``position``: R (B, N * B) float32 and valid (B, N * B) bool;
        ``pooled``: R (B, B) and valid (B, B).

    Raises:
        ValueError: unknown ``kind``.
    """
    m = mask.bool()
    b = h.shape[0]
    not_self = ~torch.eye(b, dtype=torch.bool, device=h.device)  # (B, B)
    if kind == "position":
        hn = normalize_tokens(h)  # (B, N, C)
        rel = torch.einsum("bnc,dnc->bnd", hn, hn)  # (B, N, B): rel[b, n, d] = cos(h[b, n], h[d, n])
        valid = m[:, :, None] & m.t()[None, :, :] & not_self[:, None, :]  # (B, N, B)
        return rel.reshape(b, -1), valid.reshape(b, -1)  # (B, N * B)
    if kind == "pooled":
        return pooled_relation(*mean_pool(h, mask))
    raise ValueError(f"sequence_relation: kind must be one of {SEQUENCE_RELATIONS}, got {kind!r}")


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each sample's real tokens, in float32. (*G, B, N, C), mask (B, N) -> ``(pooled (*G, B, C), has_token (B,) bool)``."""
    m = mask.bool()
    w = m.float()[..., None]  # (B, N, 1)
    return (h.float() * w).sum(-2) / w.sum(-2).clamp(min=1.0), m.any(1)


def pooled_relation(pooled: torch.Tensor, has_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-to-sample cosines of pooled vectors (the ``pooled`` sequence relation).

    Args:
        pooled: (*G, B, C) pooled features (:func:`mean_pool`). has_token: (B,) bool.

    Returns:
        ``(R (*G, B, B) float32, valid (B, B) bool)``, valid off the diagonal where both samples have a token.
    """
    pn = F.normalize(pooled.float(), dim=-1, eps=NORM_EPS)  # (*G, B, C)
    not_self = ~torch.eye(pooled.shape[-2], dtype=torch.bool, device=pooled.device)
    return pn @ pn.transpose(-1, -2), has_token[:, None] & has_token[None, :] & not_self


def _position_block(h: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of positions ``start:stop`` position-major, and one over their clamped norms.
    (*G, B, N, C) -> (*G, P, B, C), (*G, P, B).

    ``hp[p, b] / max(||hp[p, b]||, 1e-6)`` is :func:`normalize_tokens` of the block, never formed: the
    cosines come from the raw products, scaled (no normalised copy of the features).
    """
    hp = h[..., start:stop, :].float().transpose(-3, -2)  # (*G, P, B, C)
    return hp, 1.0 / torch.linalg.vector_norm(hp, dim=-1).clamp(min=NORM_EPS)  # (*G, P, B)


@torch.no_grad()
def _other_sample_mean(h: torch.Tensor, m: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and count of each sequence-relation row's valid entries without forming them.
    (*G, B, N, C), mask (B, N) -> (*G, B), (B,).

    Row b's entries are ``hn[b, n] . hn[d, n]`` for d != b with both tokens real (hn: ``h`` normalised);
    their sum is ``sum_n hn[b, n] . (S_n - hn[b, n])`` over real (b, n), with ``S_n`` the sum of the real
    ``hn[d, n]``, and their count ``sum_n m[b, n] * (sum_d m[d, n] - 1)``. One float32 dot product per
    (b, n), as the relation's own entries, summed over positions in float64, in blocks of ``step``
    positions. No autograd: the gradient of a Pearson correlation through its means is zero (centered
    entries sum to zero over the valid set).
    """
    b, n = m.shape
    total = torch.zeros((*h.shape[:-3], b), dtype=torch.float64, device=h.device)  # (*G, B)
    for start in range(0, n, step):
        hp, inv = _position_block(h, start, min(start + step, n))  # (*G, P, B, C), (*G, P, B)
        w = inv * m[:, start : start + step].t()  # (*G, P, B): 1 / norm at real tokens, 0 at padding
        sums = w.unsqueeze(-2) @ hp  # (*G, P, 1, C): S_p
        dots = (hp @ sums.transpose(-1, -2)).squeeze(-1) * w  # (*G, P, B, C) @ (*G, P, C, 1) -> (*G, P, B): hn[b, p] . S_p
        self_dots = (w / inv).square()  # (*G, P, B): ||hn[b, p]||^2 at real tokens
        total += (dots - self_dots).sum(-2, dtype=torch.float64)
    md = m.double()  # (B, N)
    count = (md * (md.sum(0) - 1.0)).sum(1)  # (B,)
    return (total / count.clamp(min=1.0)).float(), count


def _position_moments(h_s, h_t, m, mu_s, mu_t, start: int, stop: int):
    """Centered second moments of positions ``start:stop`` of both sequence relations. Returns three (*G, B) tensors."""
    mp = m[:, start:stop].t()  # (P, B)
    not_self = ~torch.eye(m.shape[0], dtype=torch.bool, device=h_s.device)  # (B, B)
    valid = (mp[:, :, None] & mp[:, None, :] & not_self).float()  # (P, B, B), shared by the groups
    xs = []
    for h, mu in ((h_s, mu_s), (h_t, mu_t)):
        hp, inv = _position_block(h, start, stop)  # (*G, P, B, C), (*G, P, B)
        rel = (hp @ hp.transpose(-1, -2)) * inv[..., :, None] * inv[..., None, :]  # (*G, P, B, B): cos(h[b, p], h[d, p])
        xs.append((rel - mu[..., None, :, None]) * valid)
    xs, xt = xs
    return (xs * xt).sum((-3, -1)), (xs * xs).sum((-3, -1)), (xt * xt).sum((-3, -1))


def sequence_correlation(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Pearson correlation of student and teacher ``position`` sequence relations, without B x N x B.

    Equal (to float rounding) to ``pearson_correlation(R_s, R_t, valid)`` with the rows of
    :func:`sequence_relation` (kind ``"position"``): row b's entries are ``cos(h[b, n], h[d, n])`` over
    the (n, d) with d != b and both tokens real. The row means come in closed form and the centered
    moments are summed over blocks of ``chunk_size`` positions (cosines from the raw products scaled by
    the inverse norms, so no normalised copy of the features is made); with autograd on, each block is
    recomputed in backward (activation checkpointing), so memory beyond the inputs and their gradient
    is O(chunk_size * B * (B + C)) per model instead of O(N * B * (B + C)): the (B, N, B) relation grows
    with the all-gathered global batch.

    Args:
        h_s: (*G, B, N, C_s) student features. h_t: (*G, B, N, C_t) teacher features (no gradient needed).
            Optional leading group dimensions G (e.g. stacked layer pairs) are independent problems
            (samples are related within their own group only) computed together, sharing the mask.
        mask: (B, N) attention mask.
        chunk_size: positions per block; ``None`` or >= N computes all positions at once.
        eps: added to the correlation's denominator.

    Returns:
        ``(rho, counts)``: rho (*G, B) float32; counts (B,) bool, true for rows with >= 2 valid entries
        (FCD_SPEC: a batch of 1, or a row with fewer, contributes nothing).
    """
    m = mask.bool()
    n = m.shape[1]
    step = n if chunk_size is None or chunk_size >= n else chunk_size
    mu_s, count = _other_sample_mean(h_s, m, step)  # (*G, B), (B,)
    mu_t, _ = _other_sample_mean(h_t, m, step)
    rho = _blocked_correlation(_position_moments, h_s, h_t, m, mu_s, mu_t, chunk_size, eps)
    return rho, count >= 2
