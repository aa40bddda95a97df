"""fcd_pair_terms: the layer pairs stacked give the values and gradients of one fcd_terms call per pair."""

from __future__ import annotations

import pytest
import torch

from fcd_ds.losses import fcd_pair_terms, fcd_terms

B, N, C_S, C_T = 5, 11, 6, 9


def _features(pairs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, N, C_S, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(pairs)]
    teacher = [torch.randn(B, N, C_T, generator=g, dtype=torch.float64) for _ in range(pairs)]
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 7:] = 0  # padding
    mask[3, 2:] = 0  # a sequence with 2 real tokens: no token-relation pairs, still in the sequence relation
    return student, teacher, mask


def _loss_and_grads(terms, student):
    loss = sum(t.token + 2.0 * t.sequence for t in terms)  # distinct weights, so a swapped term shows
    return [t for pair in terms for t in pair], torch.autograd.grad(loss, student)


@pytest.mark.parametrize("kind", ["position", "pooled"])
@pytest.mark.parametrize("chunk_size", [None, 22, 33, 5])  # all 4 pairs at once; groups of 2; 3 + 1; one by one in blocks
def test_stacked_pairs_equal_one_call_per_pair(kind, chunk_size):
    student, teacher, mask = _features(4)
    ref, ref_grads = _loss_and_grads([fcd_terms(s, t, mask, sequence_relation=kind, chunk_size=chunk_size)
                                      for s, t in zip(student, teacher)], student)
    got, got_grads = _loss_and_grads(fcd_pair_terms(student, teacher, mask, sequence_relation=kind,
                                                    chunk_size=chunk_size, stack=True), student)
    assert len(got) == 8 and all(v.dim() == 0 and v.dtype == torch.float32 for v in got)
    assert torch.allclose(torch.stack(got), torch.stack(ref), atol=1e-6, rtol=0)
    assert len({round(v.item(), 4) for v in got}) > 4  # the pairs differ, so a mixed-up order would show
    for a, b in zip(got_grads, ref_grads):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_a_block_in_two_pairs_gets_both_gradients():
    student, teacher, mask = _features(2)
    one = student[0]
    ref = sum(sum(fcd_terms(one, t, mask)) for t in teacher)
    got = sum(sum(t) for t in fcd_pair_terms([one, one], teacher, mask, stack=True))
    (g_ref,), (g_got,) = torch.autograd.grad(ref, [one]), torch.autograd.grad(got, [one])
    assert abs(got.item() - ref.item()) < 1e-6 and torch.allclose(g_got, g_ref, atol=1e-6, rtol=0)


def test_weights_switch_terms_off_and_bf16_math_stays_float32():
    student, teacher, mask = _features(3)
    bf16 = [s.detach().to(torch.bfloat16) for s in student]
    t16 = [t.to(torch.bfloat16) for t in teacher]
    got = fcd_pair_terms(bf16, t16, mask, beta=0.0, stack=True)
    ref = [fcd_terms(s.float(), t.float(), mask) for s, t in zip(bf16, t16)]  # the same bf16 values, upcast
    for g, r in zip(got, ref):
        assert g.token.dtype == torch.float32 and abs(g.token.item() - r.token.item()) < 1e-5
        assert g.sequence.item() == 0.0


def test_one_by_one_on_cpu_by_default_is_the_same_graph_as_fcd_terms():
    student, teacher, mask = _features(2)
    got = fcd_pair_terms(student, teacher, mask)  # stack=None: features on the CPU, no stacking
    ref = [fcd_terms(s, t, mask) for s, t in zip(student, teacher)]
    assert all(torch.equal(g.token, r.token) and torch.equal(g.sequence, r.sequence) for g, r in zip(got, ref))


@pytest.mark.parametrize("student_n, teacher_n, message", [
    (2, 1, "as many student as teacher features"),
    (0, 0, "at least 1"),
])
def test_pair_lists_must_match(student_n, teacher_n, message):
    student, teacher, mask = _features(2)
    with pytest.raises(ValueError, match=message):
        fcd_pair_terms(student[:student_n], teacher[:teacher_n], mask)


def test_pairs_of_one_model_must_share_a_shape():
    student, teacher, mask = _features(2)
    with pytest.raises(ValueError, match="every student feature must have one shape"):
        fcd_pair_terms([student[0], student[1][:, :, :4]], teacher, mask, stack=True)
