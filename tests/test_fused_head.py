"""fcd_ds.fused_head: CE and logit KD computed inside the student's LM head (chunk by chunk, the teacher's
head an identity) give the plain losses' values and student gradients, for tied (GPT-2) and untied
(Llama) heads, and leave both models whole; in real 2-rank ZeRO-3 runs (student and teacher
partitioned, tied head) the fused and the plain path train alike, step for step."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_ok, read_train_log, run_launcher, tiny_config
from fcd_ds.fused_head import FusedLogitHead, fused_head_problem
from fcd_ds.losses import causal_lm_loss, logit_kd_loss


def _pair(kind: str):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(kind, 4, 64)).eval()
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(tiny_config(kind, 2, 32)).train()
    return student, teacher


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # GPT-2 ties its head to the input embedding, Llama here does not
@pytest.mark.parametrize("ce_weight, kd_weight", [(0.7, 0.3), (0.0, 1.0), (1.0, 0.0)])
def test_fused_head_equals_the_plain_losses_and_gradients(kind, ce_weight, kd_weight):
    student, teacher = _pair(kind)
    ids = torch.randint(0, 512, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # a padded row
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits  # (B, N, V)
    plain_logits = student(input_ids=ids, attention_mask=mask).logits
    ce, kd = causal_lm_loss(plain_logits, ids, mask), logit_kd_loss(plain_logits, t_logits, mask, temperature=2.0)
    (ce_weight * ce + kd_weight * kd).backward()
    plain_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    fused = FusedLogitHead(student, teacher, ce_weight=ce_weight, kd_weight=kd_weight, temperature=2.0, chunk_size=7)
    with torch.no_grad(), fused.teacher_hidden():
        t_hidden = teacher(input_ids=ids, attention_mask=mask).logits
    assert t_hidden.shape == ((3, 20, 64) if kd_weight else (3, 20, 512))  # last hidden states, not logits (KD on)
    with fused.student_loss(ids, mask, t_hidden if kd_weight else None) as result:
        out = student(input_ids=ids, attention_mask=mask)
    terms = result[0]
    assert out.logits is terms.loss  # the head returned the loss
    assert terms.loss.item() == pytest.approx((ce_weight * ce + kd_weight * kd).item(), abs=1e-5)
    assert (terms.ce is None) == (ce_weight == 0) and (terms.kd is None) == (kd_weight == 0)
    if ce_weight:
        assert terms.ce.item() == pytest.approx(ce.item(), abs=1e-5)
    if kd_weight:
        assert terms.kd.item() == pytest.approx(kd.item(), abs=1e-5)
    out.logits.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # both models are whole again
    with torch.no_grad():
        assert student(input_ids=ids).logits.shape == (3, 20, 512)
        torch.testing.assert_close(teacher(input_ids=ids, attention_mask=mask).logits, t_logits)


def test_fused_head_refuses_what_it_cannot_run():
    student, teacher = _pair("llama")
    with pytest.raises(ValueError, match="both 0"):
        FusedLogitHead(student, teacher, ce_weight=0, kd_weight=0, temperature=2.0)
    with pytest.raises(ValueError, match="needs the teacher"):
        FusedLogitHead(student, None, ce_weight=1, kd_weight=1, temperature=2.0)
    fused = FusedLogitHead(student, teacher, ce_weight=1, kd_weight=1, temperature=2.0)
    with pytest.raises(ValueError, match="needs teacher_hidden"):
        with fused.student_loss(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), None):
            pass
    student.lm_head = None  # no output embeddings
    assert "no output embeddings" in fused_head_problem(student)


def test_zero3_fused_and_plain_logit_losses_train_alike(tiny_models, corpus, tmp_path):
    """2 ranks, student and teacher ZeRO-3 with every parameter partitioned, GPT-2's tied head: two steps of
    CE + FCD + KD with the fused head and with the plain logits log the same terms (the second step also
    checks that the first step's gradients, hence updates, were the same), and held-out evaluation inside
    the (partitioned) heads gives the plain logits' perplexities for teacher and student."""
    from fcd_ds.config import DS_CONFIG_DIR

    cfg = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_json = tmp_path / "zero3_tiny.json"
    ds_json.write_text(json.dumps(cfg))
    logs, metrics = {}, {}
    for name, extra in (("fused", []), ("plain", ["--fused_logit_loss", "false"])):
        out = tmp_path / name
        assert_ok(run_launcher(["--teacher", tiny_models["gpt2_teacher"], "--student", tiny_models["gpt2_student"],
                                "--loss", "ce+fcd+kd", "--max_steps", 2, "--deepspeed_config", ds_json,
                                "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
                                "--per_device_train_batch_size", 2, "--max_eval_samples", 8, "--output_dir", out, *extra]))
        logs[name] = read_train_log(out)
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in logs["fused"]] == [1, 2]
    for fused, plain in zip(logs["fused"], logs["plain"]):
        for key in ("train/loss/ce", "train/loss/kd", "train/loss/fcd", "train/loss/total"):
            assert fused[key] == pytest.approx(plain[key], abs=2e-5), (fused["step"], key)
    for key in ("teacher_eval_loss", "student_eval_loss_initial", "student_eval_loss"):
        assert metrics["fused"][key] == pytest.approx(metrics["plain"][key], rel=1e-5), key


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fused_loss_sum_equals_the_plain_evaluation(kind):
    """Held-out evaluation inside the head (fused_loss_sum) gives CausalLMTask.eval_stats of the logits:
    the same summed cross-entropy and target count, with a padded row, a loss mask and an empty row."""
    from fcd_ds.fused_head import fused_loss_sum
    from fcd_ds.tasks import CausalLMTask

    student, _ = _pair(kind)
    student.eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 512, (3, 40), generator=g)  # (B, N)
    attention = torch.ones_like(ids)
    attention[1, 25:] = 0
    loss_mask = attention.clone()
    loss_mask[:, :6] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "example_mask": torch.tensor([1, 1, 0])}
    task = CausalLMTask()
    with torch.no_grad():
        plain = task.eval_stats(student(input_ids=ids, attention_mask=attention), batch)
        with fused_loss_sum(student, ids, task.eval_mask(batch), chunk_size=16):
            out = student(input_ids=ids, attention_mask=attention)
        fused = task.eval_stats(out, batch, loss_sum=out.logits)
    assert out.logits.dim() == 0  # the head returned the sum, no (B, N, V) logits
    assert fused["targets"].item() == plain["targets"].item() == (34 + 19)
    assert fused["loss_sum"].item() == pytest.approx(plain["loss_sum"].item(), rel=1e-6)
    assert "forward" not in vars(student.get_output_embeddings())  # the head is itself again

