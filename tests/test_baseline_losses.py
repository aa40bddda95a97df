"""Baseline distillation losses against independent references: hidden-state MSE (TinyBERT / BERT-PKD),
logit KD (Hinton et al.), DIST (Huang et al., NeurIPS 2022) and MiniLMv2 attention relations.

Every reference below is written from the papers / published code with explicit loops, in float64, and
never calls the code under test. The losses compute in float32, hence the ~1e-5 tolerances."""

from __future__ import annotations

import math

import pytest
import torch

from fcd_ds.losses import attention_relation, dist_loss, hidden_mse_loss, logit_kd_loss, minilm_loss, relation_kl

TOL = dict(atol=2e-5, rtol=1e-5)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=dtype)


def ragged_mask(b=3, n=7, lengths=None):
    lengths = torch.tensor(lengths if lengths is not None else [n, n - 3, 2][:b])
    return (torch.arange(n)[None, :] < lengths[:, None]).long()  # (B, N)


def with_garbage(x, mask, seed, value=1e3):
    """``x`` with large random values in the padded positions (mask 0)."""
    out = x.detach().clone()
    pad = mask == 0
    out[pad] = randn(*out[pad].shape, seed=seed, scale=value) + value
    return out


def scalar(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


# ====================================================================================================
# hidden-state MSE
# ====================================================================================================

def ref_hidden_mse(hs, ht, mask) -> float:
    total, count = 0.0, 0
    b, n, c = hs.shape
    for k in range(b):
        for i in range(n):
            if not mask[k, i]:
                continue
            count += 1
            for ch in range(c):
                total += (float(hs[k, i, ch]) - float(ht[k, i, ch])) ** 2
    return total / (count * c)


def test_hidden_mse_identical_inputs_give_zero():
    h, mask = randn(3, 7, 5, seed=1), ragged_mask()
    assert hidden_mse_loss(h, h.clone(), mask).item() == 0.0


def test_hidden_mse_matches_loop_reference():
    hs, ht, mask = randn(3, 7, 5, seed=2), randn(3, 7, 5, seed=3, scale=2.0), ragged_mask()
    out = hidden_mse_loss(hs, ht, mask)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), scalar(ref_hidden_mse(hs, ht, mask)), **TOL)
    # a full mask is plain MSE
    full = torch.ones(3, 7)
    torch.testing.assert_close(hidden_mse_loss(hs, ht, full).double(), torch.mean((hs - ht) ** 2), **TOL)


def test_hidden_mse_padding_changes_nothing():
    hs, ht, mask = randn(3, 7, 5, seed=4), randn(3, 7, 5, seed=5), ragged_mask()
    clean = hidden_mse_loss(hs, ht, mask)
    dirty_s = with_garbage(hs, mask, seed=6).requires_grad_(True)
    dirty = hidden_mse_loss(dirty_s, with_garbage(ht, mask, seed=7), mask)
    torch.testing.assert_close(dirty, clean, **TOL)
    dirty.backward()
    assert dirty_s.grad[mask == 0].abs().max().item() == 0.0  # no gradient reaches padded positions
    assert dirty_s.grad[mask == 1].abs().max().item() > 0.0


def test_hidden_mse_gradients_student_only():
    hs = randn(3, 7, 5, seed=8).requires_grad_(True)
    ht = randn(3, 7, 5, seed=9).requires_grad_(True)
    mask = ragged_mask()
    hidden_mse_loss(hs, ht, mask).backward()
    assert ht.grad is None or ht.grad.abs().max().item() == 0.0
    assert hs.grad is not None and hs.grad.abs().max().item() > 0.0
    # analytic gradient of the masked mean: 2 (hs - ht) / (real tokens * C) on real tokens
    expected = 2 * (hs - ht).detach() * mask[..., None] / (mask.sum() * 5)
    torch.testing.assert_close(hs.grad, expected, atol=1e-6, rtol=1e-5)


def test_hidden_mse_empty_mask_gives_zero_with_zero_gradient():
    hs = randn(2, 4, 3, seed=10).requires_grad_(True)
    out = hidden_mse_loss(hs, randn(2, 4, 3, seed=11), torch.zeros(2, 4))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(hs.grad).all() and hs.grad.abs().max().item() == 0.0


def test_hidden_mse_shape_mismatch_raises():
    with pytest.raises(ValueError):
        hidden_mse_loss(randn(2, 4, 3), randn(2, 4, 5), torch.ones(2, 4))  # widths differ, no projection
    with pytest.raises(ValueError):
        hidden_mse_loss(randn(2, 4, 3), randn(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        hidden_mse_loss(randn(2, 4, 3), randn(2, 4, 3), torch.ones(2, 5))


# ====================================================================================================
# logit KD (Hinton et al. 2015)
# ====================================================================================================

def ref_logit_kd(s, t, mask, temperature) -> float:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per token, averaged over masked tokens, in plain python math."""
    b, n, v = s.shape
    total, count = 0.0, 0
    for k in range(b):
        for i in range(n):
            if not mask[k, i]:
                continue
            zs = [float(s[k, i, j]) / temperature for j in range(v)]
            zt = [float(t[k, i, j]) / temperature for j in range(v)]
            ns, nt = sum(math.exp(z) for z in zs), sum(math.exp(z) for z in zt)
            ps, pt = [math.exp(z) / ns for z in zs], [math.exp(z) / nt for z in zt]
            total += sum(pt[j] * (math.log(pt[j]) - math.log(ps[j])) for j in range(v))
            count += 1
    return temperature**2 * total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_logit_kd_matches_hand_computed_kl(temperature):
    s, t = randn(2, 3, 4, seed=20, scale=2.0), randn(2, 3, 4, seed=21, scale=2.0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = logit_kd_loss(s, t, mask, temperature=temperature)
    torch.testing.assert_close(out.double(), scalar(ref_logit_kd(s, t, mask, temperature)), **TOL)
    # the masked token does not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 2], t2[0, 2] = 50.0, -30.0
    torch.testing.assert_close(logit_kd_loss(s2, t2, mask, temperature=temperature), out, **TOL)


def test_logit_kd_identical_logits_give_zero_and_teacher_gets_no_gradient():
    t = randn(2, 3, 4, seed=22, scale=3.0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert logit_kd_loss(t, t.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    s = randn(2, 3, 4, seed=23).requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    logit_kd_loss(s, tt, mask).backward()
    assert tt.grad is None or tt.grad.abs().max().item() == 0.0
    assert s.grad.abs().max().item() > 0.0


# ====================================================================================================
# DIST (Tao Huang et al., NeurIPS 2022) -- reference transcribed from the authors' published code
# ====================================================================================================

def _cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _pearson(a, b, eps=1e-8):
    return _cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def ref_dist(z_s, z_t, tau=1.0, beta=1.0, gamma=1.0):
    """DIST on (S, C) logits, float64."""
    y_s = torch.softmax(z_s.double() / tau, dim=1)
    y_t = torch.softmax(z_t.double() / tau, dim=1)
    inter = 1 - _pearson(y_s, y_t).mean()
    intra = 1 - _pearson(y_s.T, y_t.T).mean()
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("tau,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0), (0.5, 2.0, 0.3), (2.0, 0.0, 1.0), (1.5, 1.0, 0.0)])
def test_dist_matches_reference_2d(tau, beta, gamma):
    z_s, z_t = randn(6, 5, seed=30, scale=2.0), randn(6, 5, seed=31, scale=3.0)
    out = dist_loss(z_s, z_t, temperature=tau, inter_weight=beta, intra_weight=gamma)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), ref_dist(z_s, z_t, tau, beta, gamma), **TOL)
    # a (B,) mask keeps only the listed samples
    keep = torch.tensor([1, 0, 1, 1, 0, 1])
    out_m = dist_loss(z_s, z_t, keep, temperature=tau, inter_weight=beta, intra_weight=gamma)
    torch.testing.assert_close(out_m.double(), ref_dist(z_s[keep.bool()], z_t[keep.bool()], tau, beta, gamma), **TOL)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_dist_sequence_logits_with_mask_equal_reference_on_flattened_real_rows(tau):
    z_s, z_t, mask = randn(3, 7, 6, seed=32, scale=2.0), randn(3, 7, 6, seed=33, scale=2.0), ragged_mask()
    rows_s = torch.stack([z_s[k, i] for k in range(3) for i in range(7) if mask[k, i]])  # (S, C)
    rows_t = torch.stack([z_t[k, i] for k in range(3) for i in range(7) if mask[k, i]])
    out = dist_loss(z_s, z_t, mask, temperature=tau, inter_weight=0.7, intra_weight=1.3)
    torch.testing.assert_close(out.double(), ref_dist(rows_s, rows_t, tau, 0.7, 1.3), **TOL)
    # garbage in the padded rows changes nothing
    dirty = dist_loss(with_garbage(z_s, mask, 34, 50.0), with_garbage(z_t, mask, 35, 50.0), mask,
                      temperature=tau, inter_weight=0.7, intra_weight=1.3)
    torch.testing.assert_close(dirty, out, **TOL)
    # no mask: every token counts
    all_s, all_t = z_s.reshape(-1, 6), z_t.reshape(-1, 6)
    torch.testing.assert_close(dist_loss(z_s, z_t, temperature=tau).double(), ref_dist(all_s, all_t, tau), **TOL)


def test_dist_identical_logits_give_zero():
    z = randn(3, 7, 6, seed=36, scale=2.0)
    assert dist_loss(z, z.clone(), ragged_mask(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(z[0], z[0].clone()).item() == pytest.approx(0.0, abs=1e-5)


def test_dist_teacher_gets_no_gradient():
    z_s = randn(3, 7, 6, seed=37).requires_grad_(True)
    z_t = randn(3, 7, 6, seed=38).requires_grad_(True)
    dist_loss(z_s, z_t, ragged_mask()).backward()
    assert z_t.grad is None or z_t.grad.abs().max().item() == 0.0
    assert z_s.grad is not None and z_s.grad.abs().max().item() > 0.0


@pytest.mark.parametrize("case", ["one_masked_row", "empty_mask", "single_sample"])
def test_dist_fewer_than_two_samples_gives_zero_with_zero_gradient(case):
    if case == "single_sample":
        z_s, z_t, mask = randn(1, 5, seed=39), randn(1, 5, seed=40), None
    else:
        z_s, z_t = randn(2, 4, 5, seed=39), randn(2, 4, 5, seed=40)
        mask = torch.zeros(2, 4)
        if case == "one_masked_row":
            mask[1, 2] = 1
    z_s.requires_grad_(True)
    out = dist_loss(z_s, z_t, mask)
    out.backward()
    assert out.item() == 0.0
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().max().item() == 0.0


def test_dist_invariant_to_per_row_logit_shift():
    z_s, z_t, mask = randn(3, 7, 6, seed=41, scale=2.0), randn(3, 7, 6, seed=42, scale=2.0), ragged_mask()
    shift_s, shift_t = randn(3, 7, 1, seed=43, scale=5.0), randn(3, 7, 1, seed=44, scale=5.0)
    for tau in (1.0, 2.5):
        base = dist_loss(z_s, z_t, mask, temperature=tau)
        torch.testing.assert_close(dist_loss(z_s + shift_s, z_t + shift_t, mask, temperature=tau), base, **TOL)
    assert base.item() > 0.01  # the check is not vacuous


def test_dist_bad_inputs_raise():
    with pytest.raises(ValueError):
        dist_loss(randn(4, 5), randn(4, 5), temperature=0.0)
    with pytest.raises(ValueError):
        dist_loss(randn(4, 5), randn(4, 6))
    with pytest.raises(ValueError):
        dist_loss(randn(2, 3, 5), randn(2, 3, 5), torch.ones(2, 4))


# ====================================================================================================
# MiniLMv2 self-attention relations
# ====================================================================================================

def ref_attention_relation(x, mask, num_heads):
    """(B, H, N, N) log-relations, one head at a time, padding keys at -inf."""
    b, n, c = x.shape
    d = c // num_heads
    out = torch.empty(b, num_heads, n, n, dtype=torch.float64)
    for h in range(num_heads):
        xh = x[:, :, h * d:(h + 1) * d].double()
        scores = xh @ xh.transpose(1, 2) / math.sqrt(d)  # (B, N, N)
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        out[:, h] = torch.log_softmax(scores, dim=-1)
    return out


def ref_minilm(student_qkv, teacher_qkv, mask, num_heads) -> float:
    """sum over the 3 kinds of mean over (heads, real queries) of KL(teacher row || student row),
    each row a softmax over the real keys only, by explicit loops."""
    b, n = mask.shape
    total = 0.0
    for x_s, x_t in zip(student_qkv, teacher_qkv):
        d_s, d_t = x_s.shape[-1] // num_heads, x_t.shape[-1] // num_heads
        acc, count = 0.0, 0
        for k in range(b):
            real = [i for i in range(n) if mask[k, i]]
            count += len(real)
            for h in range(num_heads):
                qs = x_s[k, real, h * d_s:(h + 1) * d_s].double()  # (R, d_s)
                qt = x_t[k, real, h * d_t:(h + 1) * d_t].double()
                for r in range(len(real)):
                    p_s = torch.softmax(qs @ qs[r] / math.sqrt(d_s), dim=0)  # over the real keys
                    p_t = torch.softmax(qt @ qt[r] / math.sqrt(d_t), dim=0)
                    acc += float((p_t * (p_t.log() - p_s.log())).sum())
        total += acc / (count * num_heads)
    return total


def qkv(b, n, widths, seed, scale=1.0):
    return tuple(randn(b, n, c, seed=seed + i, scale=scale) for i, c in enumerate(widths))


@pytest.mark.parametrize("c,num_heads", [(12, 4), (12, 3), (8, 1), (6, 6)])
def test_attention_relation_matches_per_head_loop(c, num_heads):
    x, mask = randn(3, 7, c, seed=50, scale=1.5), ragged_mask()
    out = attention_relation(x, mask, num_heads)
    assert out.shape == (3, num_heads, 7, 7) and out.dtype == torch.float32
    ref = ref_attention_relation(x, mask, num_heads)
    keys = mask.bool()[:, None, None, :].expand_as(ref)
    torch.testing.assert_close(out.double()[keys], ref[keys], **TOL)
    assert out.exp()[~keys].abs().max().item() == 0.0  # padding keys get no probability
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, num_heads, 7), atol=1e-5, rtol=0)


def test_relation_kl_matches_loop():
    mask = ragged_mask()
    x_s, x_t = randn(3, 7, 8, seed=51), randn(3, 7, 8, seed=52)
    out = relation_kl(attention_relation(x_s, mask, 2), attention_relation(x_t, mask, 2), mask)
    torch.testing.assert_close(out.double(), scalar(ref_minilm([x_s], [x_t], mask, 2)), **TOL)


@pytest.mark.parametrize(
    "student_widths,teacher_widths,num_heads",
    [
        ((8, 8, 8), (12, 12, 12), 4),  # narrower student, more channels per relation head in the teacher
        ((8, 8, 8), (12, 12, 12), 2),
        ((8, 4, 4), (12, 4, 4), 4),  # GQA-like: keys/values narrower than queries
        ((12, 4, 4), (12, 4, 4), 2),
        ((8, 4, 4), (12, 8, 8), 4),
    ],
)
def test_minilm_matches_explicit_loop(student_widths, teacher_widths, num_heads):
    mask = ragged_mask()
    s, t = qkv(3, 7, student_widths, seed=60), qkv(3, 7, teacher_widths, seed=70, scale=1.5)
    out = minilm_loss(s, t, mask, num_heads=num_heads)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), scalar(ref_minilm(s, t, mask, num_heads)), **TOL)
    assert out.item() > 0.01


def test_minilm_identical_inputs_give_zero():
    mask = ragged_mask()
    s = qkv(3, 7, (12, 4, 4), seed=80, scale=2.0)
    assert minilm_loss(s, tuple(x.clone() for x in s), mask, num_heads=4).item() == pytest.approx(0.0, abs=1e-6)


def test_minilm_zero_for_equal_relations_across_widths():
    """Teacher heads [a * x_h, 0] of width 3 reproduce student heads x_h of width 2 when a^2 / sqrt(3) = 1 / sqrt(2):
    checks both the head split and the 1/sqrt(d) scaling of each model's own head size."""
    mask, num_heads = ragged_mask(), 4
    s = qkv(3, 7, (8, 8, 8), seed=85)
    a = (3 / 2) ** 0.25
    t = []
    for x in s:
        heads = x.view(3, 7, num_heads, 2)
        t.append(torch.cat([a * heads, torch.zeros(3, 7, num_heads, 1, dtype=x.dtype)], -1).reshape(3, 7, 12))
    assert minilm_loss(s, t, mask, num_heads=num_heads).item() == pytest.approx(0.0, abs=1e-5)
    # without the matching scale the relations differ
    assert minilm_loss(s, [x / a for x in t], mask, num_heads=num_heads).item() > 1e-3


def test_minilm_invariant_to_permuting_relation_heads_in_both_models():
    mask, num_heads = ragged_mask(), 4
    s, t = qkv(3, 7, (8, 4, 4), seed=90), qkv(3, 7, (12, 8, 8), seed=95)
    perm = [2, 0, 3, 1]

    def permute_heads(x):
        d = x.shape[-1] // num_heads
        return torch.cat([x[..., p * d:(p + 1) * d] for p in perm], -1)

    base = minilm_loss(s, t, mask, num_heads=num_heads)
    moved = minilm_loss([permute_heads(x) for x in s], [permute_heads(x) for x in t], mask, num_heads=num_heads)
    torch.testing.assert_close(moved, base, **TOL)
    # permuting only the student's heads pairs them with other teacher heads: the value changes
    only_s = minilm_loss([permute_heads(x) for x in s], t, mask, num_heads=num_heads)
    assert abs(only_s.item() - base.item()) > 1e-3


def test_minilm_padding_changes_nothing():
    mask = ragged_mask()
    s, t = qkv(3, 7, (8, 4, 4), seed=100), qkv(3, 7, (12, 8, 8), seed=105)
    base = minilm_loss(s, t, mask, num_heads=4)
    dirty_s = [with_garbage(x, mask, seed=110 + i, value=30.0).requires_grad_(True) for i, x in enumerate(s)]
    dirty_t = [with_garbage(x, mask, seed=120 + i, value=30.0) for i, x in enumerate(t)]
    dirty = minilm_loss(dirty_s, dirty_t, mask, num_heads=4)
    torch.testing.assert_close(dirty, base, **TOL)
    dirty.backward()
    for x in dirty_s:
        assert x.grad[mask == 0].abs().max().item() == 0.0
        assert x.grad[mask == 1].abs().max().item() > 0.0


def test_minilm_teacher_gets_no_gradient():
    mask = ragged_mask()
    s = [x.requires_grad_(True) for x in qkv(3, 7, (8, 4, 4), seed=130)]
    t = [x.requires_grad_(True) for x in qkv(3, 7, (12, 8, 8), seed=135)]
    minilm_loss(s, t, mask, num_heads=4).backward()
    for x in t:
        assert x.grad is None or x.grad.abs().max().item() == 0.0
    for x in s:
        assert x.grad is not None and x.grad.abs().max().item() > 0.0


def test_minilm_bad_inputs_raise():
    mask = torch.ones(2, 5)
    with pytest.raises(ValueError):
        attention_relation(randn(2, 5, 10), mask, 4)
    with pytest.raises(ValueError):
        attention_relation(randn(2, 5, 8), mask, 0)
    with pytest.raises(ValueError):  # 4 heads divide the queries (12) but not the keys/values (6)
        minilm_loss(qkv(2, 5, (12, 6, 6), 1), qkv(2, 5, (12, 8, 8), 2), mask, num_heads=4)
    with pytest.raises(ValueError):  # ... nor the teacher's width
        minilm_loss(qkv(2, 5, (8, 8, 8), 1), qkv(2, 5, (10, 8, 8), 2), mask, num_heads=4)
    with pytest.raises(ValueError):
        minilm_loss(qkv(2, 5, (8, 8), 1), qkv(2, 5, (8, 8, 8), 2), mask, num_heads=4)
    with pytest.raises(ValueError):
        minilm_loss(qkv(2, 5, (8, 8, 8), 1), qkv(2, 6, (8, 8, 8), 2), mask, num_heads=4)


# ====================================================================================================
# gradients
# ====================================================================================================
# The losses compute in float32 by design, so gradcheck's default float64 settings (eps 1e-6, atol 1e-5)
# would measure float32 rounding noise (~1e-7 / 1e-6) rather than the gradient: the finite-difference step
# and tolerances below are sized for float32 arithmetic. The exact float64 gradient of the reference is
# also compared with autograd's gradient.

GRADCHECK = dict(eps=1e-3, atol=2e-3, rtol=2e-3)


def test_dist_gradcheck():
    z_s = randn(2, 3, 4, seed=140).requires_grad_(True)
    z_t = randn(2, 3, 4, seed=141)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda z: dist_loss(z, z_t, mask, temperature=2.0, inter_weight=0.5, intra_weight=1.5), (z_s,), **GRADCHECK
    )
    dist_loss(z_s, z_t, mask, temperature=2.0, inter_weight=0.5, intra_weight=1.5).backward()
    z_ref = z_s.detach().clone().requires_grad_(True)
    keep = mask.bool()
    ref_dist(z_ref[keep], z_t[keep], 2.0, 0.5, 1.5).backward()
    torch.testing.assert_close(z_s.grad, z_ref.grad, atol=1e-5, rtol=1e-4)


def test_minilm_gradcheck():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = [x.requires_grad_(True) for x in qkv(2, 3, (4, 2, 2), seed=150)]
    t = qkv(2, 3, (6, 4, 4), seed=155)
    assert torch.autograd.gradcheck(lambda q, k, v: minilm_loss((q, k, v), t, mask, num_heads=2), tuple(s), **GRADCHECK)
    minilm_loss(s, t, mask, num_heads=2).backward()
    s_ref = [x.detach().clone().requires_grad_(True) for x in s]
    total = torch.zeros((), dtype=torch.float64)
    for x_s, x_t in zip(s_ref, t):  # float64 reference, differentiable
        ls, lt = ref_attention_relation(x_s, mask, 2), ref_attention_relation(x_t, mask, 2)
        keys = mask.bool()[:, None, None, :]
        kl = torch.where(keys, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(-1)  # (B, H, N)
        total = total + (kl * mask[:, None, :]).sum() / (mask.sum() * 2)
    total.backward()
    for x, r in zip(s, s_ref):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-5, rtol=1e-4)
