"""Logit losses fused with the LM head (fcd_ds/losses/fused.py): equal to causal_lm_loss / logit_kd_loss on
the materialised logits, value and gradients, at every chunk size; bf16; gradcheck; errors; and the
(B, N, V) logits never held (profiler allocation peak)."""

from __future__ import annotations

import pytest
import torch

from conftest import peak_allocated_bytes

from fcd_ds.losses import fused
from fcd_ds.losses import (
    causal_lm_loss,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kd,
    logit_kd_loss,
)

B, N, C_S, C_T, V = 3, 11, 8, 12, 97  # B * N = 33 tokens
T = 2.5
CHUNKS = (1, 7, 33, 1000)  # one token, a non-divisor of B * N, B * N, more than B * N


def inputs(dtype=torch.float32, seed=0, bias=False):
    """Student (hidden, head weight[, bias]) leaves with grad, teacher (hidden, weight), ids, a mask with
    right padding (row 1) and left padding (row 2)."""
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, N, C_S, generator=g), torch.randn(V, C_S, generator=g) / C_S**0.5]
    if bias:
        s.append(torch.randn(V, generator=g))
    t = [torch.randn(B, N, C_T, generator=g), torch.randn(V, C_T, generator=g) / C_T**0.5]
    ids = torch.randint(0, V, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    return [x.to(dtype).requires_grad_(True) for x in s], [x.to(dtype) for x in t], ids, mask


def plain(s, t, ids, mask, ce_weight=1.0, kd_weight=1.0):
    """The reference: materialised logits into the plain losses. Returns (loss, ce, kd)."""
    z_s = s[0] @ s[1].T + (s[2] if len(s) > 2 else 0)  # (B, N, V)
    ce = causal_lm_loss(z_s, ids, mask)
    kd = logit_kd_loss(z_s, t[0] @ t[1].T, mask, temperature=T)
    return ce_weight * ce + kd_weight * kd, ce, kd


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_cross_entropy_equals_plain(chunk):
    s, _, ids, mask = inputs(bias=True)
    ref = causal_lm_loss(s[0] @ s[1].T + s[2], ids, mask)
    out = fused_linear_cross_entropy(s[0], s[1], ids, mask, bias=s[2], chunk_size=chunk)
    assert out.dtype == torch.float32
    assert_close(out, ref)
    for a, b in zip(grads(out, s), grads(ref, s)):
        assert_close(a, b)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_kd_equals_plain_with_different_widths(chunk):
    s, t, _, mask = inputs()
    ref = logit_kd_loss(s[0] @ s[1].T, t[0] @ t[1].T, mask, temperature=T)
    out = fused_linear_kd(s[0], s[1], t[0], t[1], mask, temperature=T, chunk_size=chunk)
    assert_close(out, ref)
    for a, b in zip(grads(out, s), grads(ref, s)):
        assert_close(a, b)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ce_kd_in_one_loop_equals_plain(chunk):
    s, t, ids, mask = inputs(bias=True)
    ref, ref_ce, ref_kd = plain(s, t, ids, mask, 0.3, 0.7)
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, ce_weight=0.3, kd_weight=0.7,
                             student_bias=s[2], chunk_size=chunk)
    assert_close(out.loss, ref)
    assert_close(out.ce, ref_ce)
    assert_close(out.kd, ref_kd)
    assert not out.ce.requires_grad and not out.kd.requires_grad
    for a, b in zip(grads(out.loss, s), grads(ref, s)):
        assert_close(a, b)


# one vocabulary row; a non-divisor of V; V - 1 (a last tile of one row); None: one matmul, the GPU path (and
# the path of every other test here: V = 97 is below the default tile)
@pytest.mark.parametrize("tile", (1, 10, 96, None))
def test_cpu_vocabulary_tiles_equal_plain(monkeypatch, tile):
    # on a CPU the logits matmul runs CPU_VOCAB_TILE vocabulary rows at a time
    monkeypatch.setattr(fused, "CPU_VOCAB_TILE", tile)
    s, t, ids, mask = inputs(bias=True)
    ref, ref_ce, ref_kd = plain(s, t, ids, mask, 0.3, 0.7)
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, ce_weight=0.3, kd_weight=0.7,
                             student_bias=s[2], chunk_size=7)
    assert_close(out.ce, ref_ce)
    assert_close(out.kd, ref_kd)
    for a, b in zip(grads(out.loss, s), grads(ref, s)):
        assert_close(a, b)


def test_grad_output_scales_the_gradients_and_terms_combine():
    # the loss inside a bigger graph: 3 * loss + another term; backward scales the kept gradients by 3
    s, t, ids, mask = inputs()
    extra = lambda: (s[0] ** 2).mean()  # noqa: E731
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, chunk_size=5)
    for a, b in zip(grads(3 * out.loss + extra(), s), grads(3 * plain(s, t, ids, mask)[0] + extra(), s)):
        assert_close(a, b)


@pytest.mark.parametrize("scale", (1.0, 3.0))
def test_repeated_backward_and_accumulation_stay_exact(scale):
    # backward returns the kept gradients themselves when grad_output is 1: a second backward through the same
    # graph (retain_graph) and .grad accumulation over two backwards must still give exactly twice the gradient
    s, t, ids, mask = inputs()
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, chunk_size=5)
    (scale * out.loss).backward(retain_graph=True)
    first = [x.grad.clone() for x in s]
    (scale * out.loss).backward()
    ref = grads(scale * plain(s, t, ids, mask)[0], s)
    for a, g, b in zip(first, (x.grad for x in s), ref):
        assert_close(a, b)
        assert_close(g, 2 * b)

def test_zero_weight_term_is_skipped():
    s, t, ids, mask = inputs()
    only_kd = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, ce_weight=0.0)
    only_ce = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, kd_weight=0.0)
    assert only_kd.ce is None and only_ce.kd is None
    _, ce, kd = plain(s, t, ids, mask)
    assert_close(only_kd.loss, kd)
    assert_close(only_ce.loss, ce)


def test_no_grad_gives_the_same_values():
    s, t, ids, mask = inputs()
    with torch.no_grad():
        out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, chunk_size=4)
        _, ce, kd = plain(s, t, ids, mask)
        ce_sum = fused_linear_cross_entropy(s[0], s[1], ids, mask, reduction="sum")
    assert_close(out.ce, ce)
    assert_close(out.kd, kd)
    assert_close(ce_sum, causal_lm_loss(s[0] @ s[1].T, ids, mask, reduction="sum").detach())


@pytest.mark.parametrize("tile", (None, 10))  # one matmul; bf16 tiles copied into the float32 buffer
def test_bf16_inputs_float32_result(monkeypatch, tile):
    # reference: the plain losses in float32 on the same bf16-representable values
    monkeypatch.setattr(fused, "CPU_VOCAB_TILE", tile)
    s, t, ids, mask = inputs(torch.bfloat16)
    s32 = [x.detach().float().requires_grad_(True) for x in s]
    ref = plain(s32, [x.float() for x in t], ids, mask)[0]
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T, chunk_size=7)
    assert out.loss.dtype == out.ce.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=1e-3, atol=1e-3)
    for a, b, x in zip(grads(out.loss, s), grads(ref, s32), s):
        assert a.dtype == x.dtype == torch.bfloat16
        assert ((a.float() - b).norm() / b.norm()).item() < 1e-2


def test_gradcheck_float64():
    b, n, c_s, c_t, v = 2, 4, 3, 5, 7
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((b, n, c_s), (v, c_s), (v,))]
    h_t, w_t = torch.randn(b, n, c_t, generator=g, dtype=torch.float64), torch.randn(v, c_t, generator=g, dtype=torch.float64)
    ids, mask = torch.randint(0, v, (b, n), generator=g), torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])

    def fn(h, w, bias):
        return fused_linear_ce_kd(h, w, h_t, w_t, ids, mask, temperature=T, ce_weight=0.4, student_bias=bias, chunk_size=3).loss

    assert fn(*s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, tuple(s))


def test_empty_mask_gives_zero_and_zero_gradient():
    s, t, ids, _ = inputs()
    mask = torch.zeros(B, N, dtype=torch.long)
    out = fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, mask, temperature=T)
    assert out.loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in grads(out.loss, s))


@pytest.mark.parametrize("call, message", [
    (lambda s, t, ids, m: fused_linear_kd(s[0], s[1][:50], t[0], t[1], m), "vocabulary"),
    (lambda s, t, ids, m: fused_linear_kd(s[0], s[1], t[0][:2], t[1], m), "same \\(B, N\\)"),
    (lambda s, t, ids, m: fused_linear_kd(s[0], s[1], t[0], t[1], m, temperature=0.0), "temperature"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1][:, :5], ids, m), "expected \\(B, N, C\\), \\(V, C\\)"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1], ids, m[:, :4]), "mask"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1], ids, m, chunk_size=0), "chunk_size"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1], ids, m, bias=torch.zeros(3)), "bias"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1].double(), ids, m), "dtype"),
    (lambda s, t, ids, m: fused_linear_cross_entropy(s[0], s[1], ids, m, reduction="none"), "reduction"),
    (lambda s, t, ids, m: fused_linear_ce_kd(s[0], s[1], t[0], t[1], ids, m, ce_weight=0, kd_weight=0), "not both 0"),
])
def test_bad_input_raises(call, message):
    s, t, ids, mask = inputs()
    with pytest.raises(ValueError, match=message):
        call(s, t, ids, mask)


def test_fused_never_holds_the_b_n_v_logits():
    # 512 tokens x 8,192 vocabulary: one float32 logits tensor is 16 MiB, a chunk's 0.5 MiB, the head 0.5 MiB
    b, n, c, v, chunk = 2, 256, 16, 8192, 16
    g = torch.Generator().manual_seed(7)
    h_s, w_s = torch.randn(b, n, c, generator=g), torch.randn(v, c, generator=g) / 8
    h_t, w_t = torch.randn(b, n, c, generator=g), torch.randn(v, c, generator=g) / 8
    ids, mask = torch.randint(0, v, (b, n), generator=g), torch.ones(b, n, dtype=torch.long)
    logits_bytes = b * n * v * 4

    def step(fused: bool):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        if fused:
            loss = fused_linear_ce_kd(hs, ws, h_t, w_t, ids, mask, chunk_size=chunk).loss
        else:
            z = hs @ ws.T  # (B, N, V)
            loss = causal_lm_loss(z, ids, mask) + logit_kd_loss(z, h_t @ w_t.T, mask)
        loss.backward()

    whole = peak_allocated_bytes(lambda: step(False))
    fused = peak_allocated_bytes(lambda: step(True))
    assert whole > 3 * logits_bytes  # the measurement sees the (B, N, V) tensors when they are held
    assert fused < logits_bytes / 2 and fused < whole / 10, (fused / logits_bytes, whole / logits_bytes)
