"""Every distillation method in real 2-rank DeepSpeed runs: each changes the student relative to the
task loss alone on the same seed (a silent no-op is the failure guarded against), and a run with only
distillation terms (``ce`` off) trains at every ZeRO stage. Tiny Llama (GQA) teacher 4 x 64 -> student
2 x 32, so hidden_mse trains its projection and minilm relates differently-shaped attention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, read_train_log, run_launcher
from fcd_ds.config import DS_CONFIG_DIR
from fcd_ds.projections import PROJECTION_ATTR

STEPS = 3


def run_args(tiny_models, corpus, out: Path, loss: str, ds_config: Path = DS_CONFIG_DIR / "zero2.json", *extra) -> list:
    return ["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"], "--loss", loss,
            "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
            "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 4, "--max_eval_samples", 8,
            "--learning_rate", 3e-3, "--warmup_steps", 1, "--max_steps", STEPS, "--seed", 5,
            "--deepspeed_config", ds_config, "--output_dir", out, *extra]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ce_only(tiny_models, corpus, tmp_path_factory) -> Path:
    """The task loss alone; also evaluated every 2 steps and not before training (--eval_on_start false)."""
    out = tmp_path_factory.mktemp("methods") / "ce"
    assert_ok(run_launcher(run_args(tiny_models, corpus, out, "ce", DS_CONFIG_DIR / "zero2.json", "--eval_steps", 2,
                                    "--eval_on_start", "false")))
    return out


def test_intermediate_evaluation_is_logged_with_training_seconds(ce_only):
    rows = [json.loads(line) for line in (ce_only / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/student_eval_perplexity" in r]
    assert [r["step"] for r in evals] == [2, STEPS]
    assert 0 < evals[0]["eval/train_seconds"] < evals[1]["eval/train_seconds"]
    metrics = json.loads((ce_only / "metrics.json").read_text())
    assert evals[1]["eval/student_eval_perplexity"] == pytest.approx(metrics["student_eval_perplexity"])
    assert "teacher_eval_perplexity" not in metrics and "student_eval_perplexity_initial" not in metrics


@pytest.mark.parametrize("loss", ["ce+kd", "ce+fcd", "ce+hidden_mse", "ce+minilm", "ce+dist"])
def test_each_method_changes_the_student_at_zero2(loss, ce_only, tiny_models, corpus, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_launcher(run_args(tiny_models, corpus, out, loss)))
    term = loss.split("+")[1]
    rows = read_train_log(out)
    assert len(rows) == STEPS
    for r in rows:
        assert math.isfinite(r[f"train/loss/{term}"]) and r[f"train/loss/{term}"] >= 0
        assert r["train/loss/total"] > r["train/loss/ce"]  # the term is in the total (all terms > 0 here)
    if term in ("hidden_mse", "minilm"):  # per layer pair too
        assert any(k.startswith(f"train/{term}/s") for k in rows[0]), sorted(rows[0])
    # The first step's task loss is the same (same init, data and seed); the student that results is not.
    ce_rows = read_train_log(ce_only)
    assert rows[0]["train/loss/ce"] == pytest.approx(ce_rows[0]["train/loss/ce"], rel=1e-5)
    assert max_difference(weights(out / "student"), weights(ce_only / "student")) > 1e-4
    config = json.loads((out / "run_config.json").read_text())["distill"]
    assert config[f"{term}_weight"] == 1.0 and config["kd_weight" if term != "kd" else "dist_weight"] == 0.0


def zero_json(directory: Path, stage: int) -> Path:
    cfg = json.loads((DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny parameters
    path = directory / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_distillation_terms_alone_train_the_student_at_every_zero_stage(stage, tiny_models, corpus, tmp_path):
    """``--loss fcd+hidden_mse+minilm``: no loss reads the student's head. Every block and the projection
    must still change; the head (no gradient from these losses) only by weight decay; the export leaves the projection out
    while the DeepSpeed checkpoint keeps it."""
    out = tmp_path / "run"
    assert_ok(run_launcher(run_args(tiny_models, corpus, out, "fcd+hidden_mse+minilm", zero_json(tmp_path, stage))))
    rows = read_train_log(out)
    assert "train/loss/ce" not in rows[0]
    before, after = weights(tiny_models["llama_student"]), weights(out / "student")
    assert after.keys() == before.keys()  # no projection in the export
    for name in after:
        moved = (after[name] - before[name]).abs().max().item()
        if name.startswith("lm_head"):
            assert moved < 2e-5, (name, moved)  # AdamW's decoupled weight decay only: no gradient reaches it
        elif ".layers." in name:
            assert moved > 1e-4, (name, moved)
    checkpoint = next((out / "checkpoints").glob("global_step*/*model_states.pt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module = state["module"] if state.get("module") else {}
    if stage < 3:  # ZeRO-3 keeps parameters in the partitioned optimizer files instead
        assert any(k.startswith(PROJECTION_ATTR) for k in module), sorted(module)[:5]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["student_eval_perplexity"])


def test_loss_balancer_and_term_gradient_norms(tiny_models, corpus, tmp_path):
    """--loss_balancer 0.5 with ce+kd+fcd: every step's total is ce + kd + 0.5 kd (the FCD term rescaled, its
    factor logged), on 2 real ranks; the factor is fraction x kd / fcd of that step. --grad_norm_steps logs
    every term's gradient norm at the student's blocks and leaves the training as it is."""
    from fcd_ds.objective import balancer_scale, weighted_total

    out, measured = tmp_path / "run", tmp_path / "measured"
    unfused = ("--fused_logit_loss", "false")  # CE and KD as two tensors, so that each has its own gradient norm
    assert_ok(run_launcher(run_args(tiny_models, corpus, out, "ce+kd+fcd", DS_CONFIG_DIR / "zero2.json", "--loss_balancer", 0.5, *unfused)))
    for r in read_train_log(out):
        assert r["train/loss/total"] == pytest.approx(r["train/loss/ce"] + 1.5 * r["train/loss/kd"], rel=1e-4)
        assert r["train/balancer/feature_scale"] > 0
    # --grad_norm_steps 2: each weighted term's gradient norm at the student's --layer_map blocks on step 2 only;
    # measuring does not change training (the same student as without it)
    assert_ok(run_launcher(run_args(tiny_models, corpus, measured, "ce+kd+fcd", DS_CONFIG_DIR / "zero2.json", "--loss_balancer", 0.5,
                                    "--grad_norm_steps", 2, *unfused)))
    rows = read_train_log(measured)
    norms = sorted(k for k in rows[1] if k.startswith("train/grad_norm/"))
    blocks = {k.rsplit("/", 1)[1] for k in norms}
    assert norms == sorted(f"train/grad_norm/{t}/{b}" for t in ("ce", "kd", "fcd") for b in blocks) and blocks, norms
    assert all(rows[1][k] > 0 for k in norms) and not any(k.startswith("train/grad_norm/") for k in {*rows[0], *rows[2]})
    assert max_difference(weights(measured / "student"), weights(out / "student")) == 0.0
    fcd = torch.tensor(0.25, requires_grad=True)
    terms = {"loss/ce": torch.tensor(1.0), "loss/kd": torch.tensor(2.0), "loss/fcd": fcd}
    w = {"ce": 1.0, "kd": 0.5, "fcd": 3.0}
    scale = balancer_scale(terms, w, 0.5)
    assert scale.item() == pytest.approx(0.5 * 0.5 * 2.0 / (3.0 * 0.25)) and not scale.requires_grad
    total = weighted_total(terms, w, feature_scale=scale)
    assert total.item() == pytest.approx(1.0 + 1.0 + 0.5)
    total.backward()
    assert fcd.grad.item() == pytest.approx(scale.item() * 3.0)  # the scale is a constant of backward
    assert balancer_scale(terms, w, 0.0) is None
    assert balancer_scale({"loss/ce": torch.tensor(1.0), "loss/fcd": fcd}, w, 0.5) is None  # no logit term


def test_fcd_weight_schedule_decays_fcd_and_keeps_the_other_terms(tiny_models, corpus, tmp_path):
    """--fcd_weight_schedule linear: FCD's weight is --fcd_weight x (1 - steps done / max_steps) in each step's
    total, logged as weight/fcd; the other terms keep theirs (2 real ranks). The schedules' shapes."""
    from fcd_ds.config import WEIGHT_SCHEDULES

    assert [WEIGHT_SCHEDULES["linear"](p) for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert WEIGHT_SCHEDULES["cosine"](0.0) == 1.0 and WEIGHT_SCHEDULES["cosine"](0.5) == pytest.approx(0.5)
    assert WEIGHT_SCHEDULES["cosine"](1.0) == pytest.approx(0.0, abs=1e-12) and WEIGHT_SCHEDULES["constant"](0.7) == 1.0
    out = tmp_path / "run"
    assert_ok(run_launcher(run_args(tiny_models, corpus, out, "ce+fcd", DS_CONFIG_DIR / "zero2.json", "--fcd_weight", 2,
                                    "--fcd_weight_schedule", "linear")))
    rows = read_train_log(out)
    for step, r in enumerate(rows):
        weight = 2.0 * (1 - step / STEPS)
        assert r["train/weight/fcd"] == pytest.approx(weight)
        assert r["train/loss/total"] == pytest.approx(r["train/loss/ce"] + weight * r["train/loss/fcd"], rel=1e-5)
