"""Preemption and faults on real 2-rank DeepSpeed runs (gloo on CPU), with dropout on and gradient
accumulation 2: SIGTERM on one rank (ZeRO-2) and SIGKILL of one rank (ZeRO-3) both resume to the losses
of an uninterrupted run, with every logged step exactly once; a half-written checkpoint is never taken;
``--save_total_limit`` prunes; a diverging loss stops with one line and keeps the last good checkpoint."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import LAUNCHER, REPO, assert_ok, free_port, read_train_log, run_launcher, snapshot, tiny_config
from fcd_ds.runtime.checkpoint import checkpoint_steps, latest_tag
from fcd_ds.config import DS_CONFIG_DIR
from fcd_ds.output_dir import claim
from fcd_ds.runtime.preemption import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE

STEPS = 14
COMPARED = ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/loss/kd", "train/lr")


@pytest.fixture(scope="module")
def dropout_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """Tiny GPT-2 teacher with dropout 0.1 everywhere (the pruned student inherits it), so resumed runs
    must restore every RNG state to match."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    cfg = tiny_config("gpt2", 4)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dropout") / "teacher"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def zero3_tiny(directory: Path) -> Path:
    cfg = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    path = directory / "zero3_tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def args(teacher: Path, corpus, out: Path, ds_config: Path, *extra) -> list:
    """14 steps of 2 micro-batches of 2 blocks x 32 tokens, logit KD on, dropout on."""
    return ["--teacher", teacher, "--student_num_layers", 2, "--max_steps", STEPS, "--kd_weight", 0.5,
            "--deepspeed_config", ds_config, "--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 2,
            "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
            "--per_device_eval_batch_size", 4, "--max_eval_samples", 16, "--learning_rate", 3e-3, "--warmup_steps", 2,
            "--output_dir", out, *extra]


def start(argv: list) -> subprocess.Popen:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(LAUNCHER), *map(str, argv)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 300) -> psutil.Process:
    """The training process of ``rank`` under a ``deepspeed`` launcher (it passes ``--local_rank=N``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} process")


def wait_for_step(out: Path, step: int, launcher: subprocess.Popen, timeout: float = 600) -> None:
    log = out / "train_log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines() if line.strip()):
            return
        assert launcher.poll() is None, f"run ended early: {launcher.communicate()}"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Every step logged once, each step's losses and lr equal to the uninterrupted run's, same final eval."""
    rows, ref = read_train_log(resumed), read_train_log(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row, expected in zip(rows, ref, strict=True):
        for key in COMPARED:
            assert row[key] == pytest.approx(expected[key], abs=1e-6), (row["step"], key)
    m_res, m_ref = (json.loads((d / "metrics.json").read_text()) for d in (resumed, reference))
    assert m_res["student_eval_loss"] == pytest.approx(m_ref["student_eval_loss"], abs=1e-6)
    assert m_res["steps"] == STEPS


@pytest.fixture(scope="module")
def zero2_reference(dropout_teacher, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2_ref") / "run"
    assert_ok(run_launcher(args(dropout_teacher, corpus, out, DS_CONFIG_DIR / "zero2.json")))
    return out


def test_sigterm_on_one_rank_saves_exits_75_and_resume_matches_an_uninterrupted_run(zero2_reference, dropout_teacher, corpus, tmp_path):
    out = tmp_path / "run"
    argv = args(dropout_teacher, corpus, out, DS_CONFIG_DIR / "zero2.json")
    proc = start(argv)
    wait_for_step(out, 3, proc)
    rank_process(proc, 1).send_signal(signal.SIGTERM)  # rank 1 only: rank 0 must stop with it
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-4000:]
    assert "rank 1: SIGTERM received" in stderr and "preempted:" in stderr
    assert "Traceback" not in stderr
    stopped = int(latest_tag(out).removeprefix("global_step"))
    assert 3 <= stopped < STEPS and checkpoint_steps(out) == [stopped]  # saved at the step it stopped
    assert not (out / "student").exists() and not (out / "metrics.json").exists()
    assert [r["step"] for r in read_train_log(out)] == list(range(1, stopped + 1))
    assert_ok(run_launcher([*argv, "--resume"]))
    assert_same_run(out, zero2_reference)


def test_sigkill_of_one_rank_keeps_the_previous_checkpoint_and_resume_matches(dropout_teacher, corpus, tmp_path):
    """ZeRO-3 (student and teacher partitioned), a checkpoint every 2 steps, at most 2 kept. A rank is
    killed outright; the other is stopped by the launcher. A half-written checkpoint folder (as a save
    cut short leaves) is ignored by --resume and removed."""
    ds_config = zero3_tiny(tmp_path)
    reference = tmp_path / "reference"
    extra = ["--save_steps", 2, "--save_total_limit", 2]
    assert_ok(run_launcher(args(dropout_teacher, corpus, reference, ds_config, *extra)))
    assert checkpoint_steps(reference) == [STEPS - 2, STEPS] and latest_tag(reference) == f"global_step{STEPS}"

    out = tmp_path / "run"
    argv = args(dropout_teacher, corpus, out, ds_config, *extra)
    proc = start(argv)
    wait_for_step(out, 5, proc)
    rank_process(proc, 1).kill()
    proc.communicate(timeout=600)
    assert proc.returncode != 0
    tag = latest_tag(out)
    assert tag is not None and json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())["step"] == int(tag[11:])
    killed_at = int(tag[11:])
    partial = out / "checkpoints" / f"global_step{killed_at + 2}.tmp"  # what a save cut short leaves behind
    partial.mkdir(exist_ok=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert_ok(run_launcher([*argv, "--resume"]))
    assert not partial.exists()
    assert_same_run(out, reference)
    assert checkpoint_steps(out) == [STEPS - 2, STEPS]


def test_a_diverging_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_models, corpus, tmp_path):
    """A learning rate of 1e30 makes the updates overflow the weights within a few steps (the warm-up's
    first rate is 0); with a checkpoint every step, the last one before the non-finite step stays latest."""
    out = tmp_path / "run"
    argv = args(tiny_models["gpt2_teacher"], corpus, out, DS_CONFIG_DIR / "zero2.json",
                "--save_steps", 1, "--learning_rate", 1e30, "--warmup_steps", 1, "--eval_on_start", "false")
    result = run_launcher(argv)
    assert result.returncode == NONFINITE_EXIT_CODE, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    match = re.match(r"error: step (\d+): non-finite training loss in (.*); stopped without saving \(the last good checkpoint "
                     r"(global_step\d+) is kept as latest\)", errors[0])
    assert match, errors[0]
    step = int(match.group(1))
    assert 2 <= step < STEPS and "loss/total" in match.group(2).split(", ")
    assert match.group(3) == latest_tag(out) == f"global_step{step - 1}" and checkpoint_steps(out) == list(range(1, step))
    rows = read_train_log(out)
    assert [r["step"] for r in rows] == list(range(1, step + 1)) and not math.isfinite(rows[-1]["train/loss/total"])
    assert all(math.isfinite(r["train/loss/total"]) for r in rows[:-1])
    assert "Traceback" not in result.stderr
    assert not (out / "student").exists()


def test_resume_without_a_checkpoint_and_a_half_written_latest_are_refused(tiny_models, corpus, tmp_path):
    """``latest`` naming a folder that is not there (a copy cut short) counts as no checkpoint: --resume
    says so in one line and changes nothing."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("global_step8")
    (out / "checkpoints" / "global_step8.tmp").mkdir()
    claim(out, ["checkpoints"])  # as the run that wrote it recorded it
    before = snapshot(out)
    result = run_launcher([*args(tiny_models["gpt2_teacher"], corpus, out, DS_CONFIG_DIR / "zero2.json"), "--resume"], ranks=1)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    latest = out / "checkpoints" / "latest"
    assert errors == [f"error: --resume: {latest} names 'global_step8', which does not exist; no complete checkpoint is left, "
                      "or drop --resume to start a new run"]
    assert snapshot(out) == before and "Traceback" not in result.stderr
