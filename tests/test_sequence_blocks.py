"""The ``position`` sequence relation computed over blocks of positions (sequence_correlation) equals the
materialised reference (sequence_relation + pearson_correlation), forward and backward, and never holds
the (B, N, B) relation."""

from __future__ import annotations

import pytest
import torch

from conftest import peak_allocated_bytes

import fcd_ds.losses.fcd as fcd_module
from fcd_ds.losses import (
    fcd_terms,
    mean_one_minus_rho,
    pearson_correlation,
    sequence_correlation,
    sequence_loss,
    sequence_relation,
)

B, N = 5, 12


def feats(c: int, seed: int, b: int = B, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g)  # (B, N, C) float32


def masks() -> dict[str, torch.Tensor]:
    """(B, N) masks: right padding with an empty and a one-token sample, left padding, holes, no padding."""
    lengths = torch.tensor([N, 7, 1, 0, N - 1])
    right = (torch.arange(N)[None, :] < lengths[:, None]).long()  # (B, N)
    left = right.flip(1)
    holes = (torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.6).long()
    holes[3] = 0
    holes[1] = 0
    holes[1, 4] = 1  # one real token, at a position other samples may also use
    return {"right": right, "left": left, "holes": holes, "none": torch.ones(B, N, dtype=torch.long)}


def reference_rho(h_s, h_t, mask):
    """Per-row correlation and counts from the materialised (B, N * B) relations."""
    rel_s, valid = sequence_relation(h_s, mask, "position")  # (B, N * B), (B, N * B)
    rel_t, _ = sequence_relation(h_t, mask, "position")
    return pearson_correlation(rel_s, rel_t, valid), valid.sum(-1) >= 2  # (B,), (B,)


CHUNKS = (None, 1, 5, N, 100)  # whole, one position, a non-divisor of N, exactly N, more than N


@pytest.mark.parametrize("kind", list(masks()))
def test_blocked_rho_and_gradient_equal_materialised(kind):
    mask = masks()[kind]
    hs, ht = feats(7, seed=1), feats(11, seed=2)
    weights = torch.rand(B, generator=torch.Generator().manual_seed(4)) + 0.5  # (B,) so no row's gradient cancels
    s = hs.clone().requires_grad_(True)
    rho_ref, counts_ref = reference_rho(s, ht, mask)
    (weights * rho_ref).sum().backward()
    grad_ref = s.grad
    assert grad_ref.abs().max() > 1e-3  # a non-trivial gradient is being compared
    for chunk in CHUNKS:
        s = hs.clone().requires_grad_(True)
        rho, counts = sequence_correlation(s, ht, mask, chunk_size=chunk)
        (weights * rho).sum().backward()
        assert torch.allclose(rho, rho_ref, rtol=0.0, atol=1e-5), (kind, chunk)
        assert counts.tolist() == counts_ref.tolist(), (kind, chunk)
        assert torch.allclose(s.grad, grad_ref, rtol=0.0, atol=1e-5), (kind, chunk)


@pytest.mark.parametrize("kind", list(masks()))
def test_blocked_sequence_loss_and_gradient_equal_materialised(kind):
    mask = masks()[kind]
    hs, ht = feats(6, seed=10), feats(9, seed=11)
    s = hs.clone().requires_grad_(True)
    rho_ref, counts_ref = reference_rho(s, ht, mask)
    loss_ref = mean_one_minus_rho(rho_ref, counts_ref)
    loss_ref.backward()
    for chunk in CHUNKS:
        s2 = hs.clone().requires_grad_(True)
        loss = sequence_loss(s2, ht, mask, kind="position", chunk_size=chunk)
        loss.backward()
        assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-5), (kind, chunk)
        assert torch.allclose(s2.grad, s.grad, rtol=0.0, atol=1e-5), (kind, chunk)


@pytest.mark.parametrize("chunk", [1, 5])
def test_blocked_edge_cases(chunk):
    # batch of one: no other sample, so 0 with a zero gradient
    one = feats(4, seed=20, b=1).requires_grad_(True)
    loss = sequence_loss(one, feats(6, seed=21, b=1), torch.ones(1, N), chunk_size=chunk)
    loss.backward()
    assert loss.item() == 0.0 and one.grad.abs().max().item() == 0.0
    # rows with < 2 valid entries count for nothing: only samples 0 and 1 share positions, at one position
    mask = torch.zeros(3, N, dtype=torch.long)
    mask[0, :4] = 1
    mask[1, 3] = 1
    rho, counts = sequence_correlation(feats(4, seed=22, b=3), feats(6, seed=23, b=3), mask, chunk_size=chunk)
    assert counts.tolist() == [False, False, False] and torch.isfinite(rho).all()
    s = feats(4, seed=22, b=3).requires_grad_(True)
    loss = sequence_loss(s, feats(6, seed=23, b=3), mask, chunk_size=chunk)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().max().item() == 0.0
    # zero features and constant relations: finite value and gradient
    z = torch.zeros(3, N, 4, requires_grad=True)
    out = sequence_loss(z, torch.zeros(3, N, 4), torch.ones(3, N), chunk_size=chunk)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_blocked_padding_invariance(chunk):
    mask = masks()["holes"]
    hs, ht = feats(6, seed=30), feats(9, seed=31)
    pad = ~mask.bool()[..., None]  # (B, N, 1)
    results = []
    for fill in (0.0, 1e3):
        s = hs.masked_fill(pad, fill).requires_grad_(True)
        loss = sequence_loss(s, ht.masked_fill(pad, -fill), mask, chunk_size=chunk)
        loss.backward()
        results.append((loss.item(), s.grad))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[0][1][pad.expand_as(hs)].abs().max().item() == 0.0  # padded features get no gradient


def test_fcd_terms_passes_chunk_size_to_the_sequence_relation(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("chunk_size"))
        return sequence_correlation(*args, **kwargs)

    monkeypatch.setattr(fcd_module, "sequence_correlation", recording)
    mask = masks()["right"]
    hs, ht = feats(6, seed=40), feats(9, seed=41)
    chunked = fcd_terms(hs, ht, mask, chunk_size=3).sequence
    whole = fcd_terms(hs, ht, mask).sequence
    assert seen == [3, None]
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)


def test_blocked_forward_backward_never_holds_the_b_n_b_relation():
    # many samples, narrow features: the (B, N, B) relation (36 MiB) dwarfs the features (0.75 MiB)
    b, n, chunk = 96, 1024, 16
    g = torch.Generator().manual_seed(50)
    hs, ht = torch.randn(b, n, 2, generator=g), torch.randn(b, n, 3, generator=g)
    mask = (torch.arange(n)[None, :] < torch.randint(n // 2, n + 1, (b,), generator=g)[:, None]).long()  # (B, N)
    relation_bytes = b * n * b * 4

    def step(chunk_size):
        s = hs.clone().requires_grad_(True)
        sequence_loss(s, ht, mask, chunk_size=chunk_size).backward()

    whole = peak_allocated_bytes(lambda: step(None))
    blocked = peak_allocated_bytes(lambda: step(chunk))
    assert whole > relation_bytes  # the measurement sees a (B, N, B) tensor when one is held
    assert blocked < relation_bytes / 4, (blocked / relation_bytes, whole / relation_bytes)
