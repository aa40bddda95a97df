"""fcd_ds.integrations: FCDTrainer computes DistillEngine's losses inside a transformers.Trainer, and
trains for real on 2 ranks under the Trainer's own DeepSpeed integration (ZeRO-2 and ZeRO-3)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, assert_ok, run_launcher
from transformers import AutoModelForCausalLM, HfArgumentParser

from fcd_ds.errors import UsageError
from fcd_ds.integrations import FCDConfig, FCDTrainer, hf_batch

FIXTURES = REPO / "tests" / "fixtures"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_trainer_losses_equal_distill_engine(tiny_models, tmp_path):
    """Same batch, same weights: every loss term of FCDTrainer.compute_loss equals DistillEngine.losses
    (DeepSpeed engines), for padded rows, an assistant-only label mask and flattened documents, and the
    task loss equals transformers' own causal-LM loss on the labels."""
    out = tmp_path / "equality.json"
    assert_ok(run_launcher(["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"], "--out", out],
                           ranks=1, launcher=FIXTURES / "hf_trainer_equality.py"))
    results = json.loads(out.read_text())
    assert set(results) == {"padded", "assistant_only", "flattened"}
    for case, losses in results.items():
        assert len(losses) == 6, losses.keys()
        for loss, r in losses.items():
            engine = {k: v for k, v in r["engine"].items() if k.startswith("loss/")}
            assert set(engine) == set(r["trainer"]), (case, loss, engine.keys(), r["trainer"].keys())
            expected = {"loss/total", *(f"loss/{t}" for t in loss.split()[0].split("+"))}
            assert set(engine) == expected, (case, loss, engine.keys())
            for key, value in engine.items():
                assert math.isfinite(value) and _rel(r["trainer"][key], value) < 1e-6, (case, loss, key, r["trainer"][key], value)
            assert _rel(r["engine"]["loss/ce"], r["hf_ce"]) < 1e-5, (case, loss, r["engine"]["loss/ce"], r["hf_ce"])
        # Fused and unfused logit losses agree (the fused head's own check, here through the Trainer).
        assert _rel(losses["ce+kd+fcd"]["trainer"]["loss/kd"], losses["ce+kd+fcd unfused"]["trainer"]["loss/kd"]) < 1e-4


@pytest.fixture(scope="module")
def trainer_runs(tiny_models, corpus, tmp_path_factory) -> dict[int, list[dict]]:
    """FCDTrainer.train() on 2 ranks with the student at ZeRO-2 (with activation checkpointing) and at
    ZeRO-3: each rank's report."""
    runs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"hf_trainer_zero{stage}")
        assert_ok(run_launcher(["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"],
                                "--train_file", corpus["train"], "--out", out, "--zero_stage", stage,
                                *(["--activation_checkpointing"] if stage == 2 else [])],
                               ranks=2, launcher=FIXTURES / "hf_trainer_run.py"))
        runs[stage] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        runs[stage][0]["out"] = str(out)
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_trains_under_hf_deepspeed(trainer_runs, stage):
    """Trainer.train() through HF's deepspeed integration: the student is a DeepSpeed engine at the
    stage asked for, the teacher its own optimizer-less engine (ZeRO-3 sharded over the ranks when the
    student runs ZeRO-3, stage 0 otherwise), frozen and unchanged; the student trains; every term is
    logged each step and in evaluation; the saved student reloads with the trained weights."""
    rank0, rank1 = trainer_runs[stage]
    facts = rank0["facts"]
    assert facts["student_engine"] == "DeepSpeedEngine" and facts["student_zero_stage"] == stage
    assert facts["student_checkpointing"] == (stage == 2)
    assert facts["teacher_engine"] == "DeepSpeedEngine" and not facts["teacher_requires_grad"]
    if stage == 3:
        assert facts["teacher_zero_stage"] == 3
        assert facts["teacher_optimizer"] == "DeepSpeedZeRoOffload"  # ZeRO-3's parameter coordinator, no optimizer state
        assert 2 * facts["teacher_shard_numel"] == facts["teacher_numel"], facts  # each rank holds half of every parameter
    else:
        assert facts["teacher_zero_stage"] == 0 and facts["teacher_optimizer"] is None
    for r in (rank0, rank1):
        assert r["after"]["teacher"] == r["before"]["teacher"]
        assert r["after"]["student"] != r["before"]["student"]
    assert rank0["after"] == rank1["after"]  # data-parallel ranks hold the same student
    steps = [h for h in rank0["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    for h in steps:
        assert all(math.isfinite(h[k]) for k in ("loss", "loss/ce", "loss/fcd", "loss/kd")), h
        # The Trainer's loss is the weighted sum of the terms (weights 1), each a mean over the step's micro-batches.
        assert _rel(h["loss"], h["loss/ce"] + h["loss/fcd"] + h["loss/kd"]) < 1e-3, h
    assert steps[-1]["loss/fcd"] < steps[0]["loss/fcd"]
    assert math.isfinite(rank0["eval"]["eval_loss"])
    saved = AutoModelForCausalLM.from_pretrained(f"{rank0['out']}/student", dtype=torch.float32)
    total = float(sum(p.detach().abs().double().sum() for p in saved.parameters()))
    assert _rel(total, rank0["after"]["student"]) < 1e-9


def test_zero2_and_zero3_trainer_runs_agree(trainer_runs):
    """The same job at ZeRO-2 with activation checkpointing and at ZeRO-3 logs the same losses and ends
    with the same student (non-reentrant checkpointing keeps the captured features in autograd)."""
    z2, z3 = ([h for h in trainer_runs[s][0]["log_history"] if "loss" in h] for s in (2, 3))
    for a, b in zip(z2, z3, strict=True):
        for key in ("loss", "loss/ce", "loss/fcd", "loss/kd"):
            assert _rel(a[key], b[key]) < 1e-4, (key, a, b)
    assert _rel(trainer_runs[2][0]["after"]["student"], trainer_runs[3][0]["after"]["student"]) < 1e-5
    assert _rel(trainer_runs[2][0]["eval"]["eval_loss"], trainer_runs[3][0]["eval"]["eval_loss"]) < 1e-4


def test_fcd_config_parses_and_checks():
    """FCDConfig is TrainingArguments plus DistillArguments: HfArgumentParser reads both kinds of flag,
    the loss weights resolve as the launchers' do, and a bad loss setting is one UsageError."""
    (cfg,) = HfArgumentParser(FCDConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--loss", "ce+kd+fcd", "--fcd_weight", "0.5", "--learning_rate", "1e-4", "--report_to", "none"])
    assert (cfg.ce_weight, cfg.kd_weight, cfg.fcd_weight, cfg.minilm_weight) == (1.0, 1.0, 0.5, 0.0)
    assert cfg.learning_rate == 1e-4 and cfg.layer_map == "uniform"
    with pytest.raises(UsageError, match="--kd_weight: kd is not in --loss ce"):
        FCDConfig(output_dir="x", loss="ce", kd_weight=1.0, report_to="none")
    with pytest.raises(UsageError, match="--fcd_sequence_relation"):
        FCDConfig(output_dir="x", fcd_sequence_relation="nope", report_to="none")


def test_hf_batch():
    """Trainer batches become fcd_ds batches: a label mask becomes loss_mask, padding alone does not,
    a flattened batch keeps its position ids, and labels that are not the input ids are refused."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    padded = hf_batch({"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)})
    assert set(padded) == {"input_ids", "attention_mask"}
    prompt = ids.clone()
    prompt[:, :2] = -100
    masked = hf_batch({"input_ids": ids, "attention_mask": attention, "labels": prompt.masked_fill(attention == 0, -100)})
    assert masked["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    flat = hf_batch({"input_ids": ids[:1], "position_ids": torch.tensor([[0, 1, 0, 1]]), "labels": torch.tensor([[-100, 6, -100, 8]])})
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1]] and flat["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert flat["loss_mask"].tolist() == [[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="labels differ from input_ids"):
        hf_batch({"input_ids": ids, "labels": ids.roll(-1, dims=1)})


def test_fcd_trainer_refuses(tiny_models, tmp_path):
    """A distillation loss without a teacher, reentrant checkpointing with FCD, and a non-FCDConfig are refused."""
    student = AutoModelForCausalLM.from_pretrained(tiny_models["llama_student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama_teacher"])
    args = FCDConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="needs teacher_model"):
        FCDTrainer(model=student, args=args)
    with pytest.raises(TypeError, match="FCDConfig"):
        from transformers import TrainingArguments

        FCDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    reentrant = FCDConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, activation_checkpointing=True,
                          activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        FCDTrainer(model=student, teacher_model=teacher, args=reentrant)
    with pytest.raises(UsageError, match="--layer_map"):
        FCDTrainer(model=student, teacher_model=teacher, args=FCDConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                                         layer_map="0:9"))
    # Only the task loss: no teacher needed, nothing of fcd_ds's distillation runs.
    ce = FCDTrainer(model=student, args=FCDConfig(output_dir=str(tmp_path), loss="ce", report_to="none", use_cpu=True))
    assert ce.teacher is None
