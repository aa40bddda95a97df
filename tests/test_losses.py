"""FCD loss: every property of FCD_SPEC.md, a loop-by-loop reference, golden values, and logit KD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fcd_ds.losses import (
    fcd_loss,
    fcd_terms,
    logit_kd_loss,
    pearson_correlation,
    sequence_loss,
    sequence_relation,
    token_correlation,
    token_loss,
    token_relation,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_fcd.json"


def feats(b=4, n=12, c=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=dtype)


def ragged_mask(b=4, n=12):
    lengths = torch.tensor([n, n - 3, 5, n - 1][:b])
    return (torch.arange(n)[None, :] < lengths[:, None]).long()  # (B, N)


# ---------- a loop-by-loop reference of FCD_SPEC.md, independent of the vectorised code ----------

def _ref_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = math.sqrt(sum((a - mx) ** 2 for a in x))
    vy = math.sqrt(sum((b - my) ** 2 for b in y))
    return cov / (vx * vy + 1e-8)


def _cos(u, v) -> float:
    return float(u @ v / (max(u.norm(), 1e-6) * max(v.norm(), 1e-6)))


def reference_fcd(hs, ht, mask) -> tuple[float, float]:
    """L_tok and L_seq (position variant) by explicit loops over FCD_SPEC steps 1-5."""
    b, n = mask.shape
    rhos = []
    for k in range(b):
        idx = [i for i in range(n) if mask[k, i]]
        if len(idx) < 3:
            continue
        xs = [_cos(hs[k, i], hs[k, j]) for i in idx for j in idx if i != j]
        xt = [_cos(ht[k, i], ht[k, j]) for i in idx for j in idx if i != j]
        rhos.append(_ref_pearson(xs, xt))
    l_tok = 1 - sum(rhos) / len(rhos) if rhos else 0.0
    rhos = []
    for k in range(b):
        entries = [(pos, d) for pos in range(n) for d in range(b) if d != k and mask[k, pos] and mask[d, pos]]
        if len(entries) < 2:
            continue
        xs = [_cos(hs[k, pos], hs[d, pos]) for pos, d in entries]
        xt = [_cos(ht[k, pos], ht[d, pos]) for pos, d in entries]
        rhos.append(_ref_pearson(xs, xt))
    l_seq = 1 - sum(rhos) / len(rhos) if rhos else 0.0
    return l_tok, l_seq


def test_matches_loop_reference_with_padding_and_different_widths():
    hs, ht, mask = feats(c=8, seed=1), feats(c=20, seed=2), ragged_mask()
    terms = fcd_terms(hs, ht, mask)
    ref_tok, ref_seq = reference_fcd(hs, ht, mask)
    assert terms.token.item() == pytest.approx(ref_tok, abs=1e-5)
    assert terms.sequence.item() == pytest.approx(ref_seq, abs=1e-5)


def test_golden_values():
    """Regression values (fixtures/golden_fcd.json), produced by reference_fcd above on seeded inputs."""
    golden = json.loads(GOLDEN.read_text())
    for case in golden["cases"]:
        hs = feats(case["b"], case["n"], case["c_s"], seed=case["seed_s"])
        ht = feats(case["b"], case["n"], case["c_t"], seed=case["seed_t"])
        mask = ragged_mask(case["b"], case["n"])
        terms = fcd_terms(hs, ht, mask)
        assert terms.token.item() == pytest.approx(case["token"], abs=1e-5)
        assert terms.sequence.item() == pytest.approx(case["sequence"], abs=1e-5)
        assert reference_fcd(hs, ht, mask) == pytest.approx((case["token"], case["sequence"]), abs=1e-9)


# ---------- invariances: loss 0 ----------

def _orthogonal(c, seed):
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("kind", ["position", "pooled"])
def test_zero_for_identity_rotation_isometry_and_token_scaling(kind):
    h, mask = feats(), ragged_mask()
    q = _orthogonal(16, 3)
    wide = torch.cat([_orthogonal(16, 4), torch.zeros(16, 24, dtype=torch.float64)], 1) @ _orthogonal(40, 5)  # (16, 40) isometry
    scale = torch.rand(4, 12, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 5 + 0.1
    for teacher in (h, h @ q, h @ wide):
        assert fcd_loss(h, teacher, mask, sequence_relation=kind).item() == pytest.approx(0.0, abs=1e-5)
    # per-token positive rescaling keeps every cosine: position relation and token relation unchanged
    assert token_loss(h * scale, h, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert sequence_loss(h * scale, h, mask, kind="position").item() == pytest.approx(0.0, abs=1e-5)


def test_bounds_and_unrelated_features_near_one():
    hs, ht = feats(b=8, n=64, c=32, seed=10), feats(b=8, n=64, c=48, seed=11)
    mask = torch.ones(8, 64)
    terms = fcd_terms(hs, ht, mask)
    for value in terms:
        assert 0.0 <= value.item() <= 2.0
        assert value.item() == pytest.approx(1.0, abs=0.1)
    anti = fcd_terms(hs, hs, mask, alpha=1, beta=1)
    assert anti.token.item() == pytest.approx(0.0, abs=1e-6)


def test_perfectly_anticorrelated_relation_gives_two():
    x = torch.randn(3, 10, dtype=torch.float64)
    assert (1 - pearson_correlation(x, -x)).min().item() == pytest.approx(2.0, abs=1e-6)


# ---------- masking ----------

@pytest.mark.parametrize("kind", ["position", "pooled"])
def test_padded_values_change_nothing(kind):
    hs, ht, mask = feats(seed=20), feats(c=24, seed=21), ragged_mask()
    pad = mask == 0
    outs = []
    for junk in (0.0, 1e3):
        s = hs.clone()
        s[pad] = junk * torch.randn_like(s[pad])
        t = ht.clone()
        t[pad] = junk * torch.randn_like(t[pad]) + junk
        s.requires_grad_(True)
        loss = fcd_loss(s, t, mask, sequence_relation=kind)
        loss.backward()
        outs.append((loss.detach(), s.grad[~pad].clone(), s.grad[pad].clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-10)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-10)
    assert outs[1][2].abs().max().item() == 0.0  # no gradient reaches padded positions


def test_degenerate_inputs_contribute_nothing_and_never_nan():
    hs = feats(b=3, n=6, c=8, seed=30).requires_grad_(True)
    ht = feats(b=3, n=6, c=8, seed=31)
    # sequence 0 has 2 real tokens (1 distinct pair): must not count in L_tok
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    only_full = token_loss(hs[1:], ht[1:], mask[1:])
    assert token_loss(hs, ht, mask).item() == pytest.approx(only_full.item(), abs=1e-12)
    # nothing valid at all: both terms 0 with zero gradient, no NaN
    empty = torch.zeros(3, 6, dtype=torch.long)
    loss = fcd_loss(hs, ht, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(hs.grad).all() and hs.grad.abs().max().item() == 0.0
    # batch of one: the sequence relation has no other sample
    one = hs[:1].detach().requires_grad_(True)
    seq = sequence_loss(one, ht[:1], torch.ones(1, 6))
    seq.backward()
    assert seq.item() == 0.0 and one.grad.abs().max().item() == 0.0
    assert sequence_loss(one, ht[:1], torch.ones(1, 6), kind="pooled").item() == 0.0
    # zero feature vectors and constant relations: finite
    z = torch.zeros(2, 5, 4, requires_grad=True)
    out = fcd_loss(z, torch.zeros(2, 5, 4), torch.ones(2, 5))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


# ---------- implementation details that must not change the value ----------

def test_streamed_token_correlation_equals_materialised_relation():
    hs, ht, mask = feats(seed=40, dtype=torch.float32), feats(c=10, seed=41, dtype=torch.float32), ragged_mask()
    rel_s, valid = token_relation(hs, mask)
    rel_t, _ = token_relation(ht, mask)
    expected = pearson_correlation(rel_s.flatten(1), rel_t.flatten(1), valid.flatten(1))  # (B,)
    for chunk in (None, 1, 5, 12, 100):
        rho, counts = token_correlation(hs, ht, mask, chunk_size=chunk)
        assert torch.allclose(rho, expected, atol=1e-5), chunk
        assert counts.tolist() == [True, True, True, True]


def test_chunked_gradient_equals_full_gradient():
    hs, ht, mask = feats(seed=50), feats(c=10, seed=51), ragged_mask()
    grads = []
    for chunk in (None, 4):
        s = hs.clone().requires_grad_(True)
        token_loss(s, ht, mask, chunk_size=chunk).backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_float32_math_for_low_precision_inputs():
    hs, ht, mask = feats(seed=60), feats(seed=61), ragged_mask()
    ref = fcd_loss(hs.float(), ht.float(), mask)
    low = fcd_loss(hs.bfloat16(), ht.bfloat16(), mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), abs=0.02)


def test_teacher_gets_no_gradient_and_weights_compose():
    hs, ht, mask = feats(seed=70).requires_grad_(True), feats(seed=71).requires_grad_(True), ragged_mask()
    t = fcd_terms(hs, ht, mask)
    total = fcd_loss(hs, ht, mask, alpha=0.3, beta=2.0)
    assert total.item() == pytest.approx(0.3 * t.token.item() + 2.0 * t.sequence.item(), abs=1e-6)
    total.backward()
    assert ht.grad is None and hs.grad is not None
    assert fcd_terms(hs, ht, mask, alpha=0.0).token.item() == 0.0


def test_pearson_matches_numpy_on_valid_entries():
    import numpy as np

    x, y = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    valid = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) > 0.3
    rho = pearson_correlation(x, y, valid)
    for k in range(3):
        v = valid[k].numpy()
        assert rho[k].item() == pytest.approx(np.corrcoef(x[k].numpy()[v], y[k].numpy()[v])[0, 1], abs=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same B and N"):
        fcd_loss(torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="sequence_relation"):
        fcd_loss(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.ones(2, 5), sequence_relation="rows")
    with pytest.raises(ValueError, match="kind"):
        sequence_relation(torch.randn(2, 5, 4), torch.ones(2, 5), kind="x")


# ---------- logit KD ----------

def test_logit_kd_identity_formula_and_mask():
    g = torch.Generator().manual_seed(80)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert logit_kd_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    temp = 3.0
    p_t = F.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1)
    expected = temp**2 * kl[mask.bool()].mean()
    assert logit_kd_loss(s, t, mask, temperature=temp).item() == pytest.approx(expected.item(), rel=1e-5)
    s2 = s.clone()
    s2[0, 3:] = 100.0  # masked positions do not matter
    assert logit_kd_loss(s2, t, mask, temperature=temp).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(s, t, mask, temperature=0)


def test_sequence_positions_read_the_relation_at_evenly_spaced_positions():
    """--fcd_sequence_positions K: the position relation of the K positions (2i + 1) N // 2K, the same value and
    student gradient as the relation of those columns alone; K = 0, None or >= N is every position; the
    identity property still holds."""
    from fcd_ds.losses.fcd import sampled_positions

    assert sampled_positions(12, 4).tolist() == [1, 4, 7, 10]
    assert sampled_positions(12, 5).tolist() == [1, 3, 6, 8, 10]
    assert sampled_positions(12, None) is None and sampled_positions(12, 0) is None and sampled_positions(12, 12) is None
    with pytest.raises(ValueError, match="positions must be >= 0"):
        sampled_positions(12, -1)
    h_s, h_t = feats(seed=3).requires_grad_(True), feats(c=24, seed=4)
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 9, 5, 11])[:, None]).long()
    kept, left = [1, 4, 7, 10], [0, 2, 3, 5, 6, 8, 9, 11]
    sub = h_s.detach()[:, kept].clone().requires_grad_(True)
    sampled = sequence_loss(h_s, h_t, mask, positions=4)
    reference = sequence_loss(sub, h_t[:, kept], mask[:, kept])
    assert torch.allclose(sampled, reference, atol=1e-7)
    sampled.backward(), reference.backward()
    assert torch.allclose(h_s.grad[:, kept], sub.grad, atol=1e-7)
    assert h_s.grad[:, left].abs().max() == 0  # positions not read get no gradient
    assert not torch.allclose(sampled, sequence_loss(h_s, h_t, mask))  # it is another value than every position's
    assert torch.equal(sequence_loss(h_s, h_t, mask, positions=0), sequence_loss(h_s, h_t, mask, positions=12))
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    assert fcd_loss(h_s, h_s @ q, mask, sequence_positions=3).abs() < 1e-5
