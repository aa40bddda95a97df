"""Resume on another number of ranks with the same global batch (issue 21): a 2-rank ZeRO-2 run stopped at
step 3 and resumed on 1 rank with twice the accumulation, and a 1-rank ZeRO-3 run resumed on 2 ranks, log
the uninterrupted run's per-step losses and end with its held-out loss; the ZeRO states come from a
universal checkpoint converted once beside the original, which is kept byte for byte; the global batch,
sequence length and seed still may not change, and a streamed corpus may not change its ranks."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_ok, read_train_log, run_launcher, run_plain, snapshot
from fcd_ds.errors import UsageError
from fcd_ds.runtime.checkpoint import check_resume_layout, reshard_position

STEPS, SAVE = 6, 3


def _args(tiny_models, corpus, out, ds_config: str) -> list:
    """CE + KD (no cross-sample relation: see the README on FCD's sequence relation) at global batch 4."""
    return ["--teacher", tiny_models["gpt2_teacher"], "--student", tiny_models["gpt2_student"], "--loss", "ce+kd",
            "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
            "--per_device_train_batch_size", 2, "--train_batch_size", 4, "--max_eval_samples", 8, "--max_steps", STEPS,
            "--save_steps", SAVE, "--eval_on_start", "false", "--deepspeed_config", f"ds_configs/{ds_config}", "--output_dir", out]


def _resume_on(tmp_path, tiny_models, corpus, ds_config: str, ranks: int, resume_ranks: int):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert_ok(run_launcher(_args(tiny_models, corpus, whole, ds_config), ranks=ranks))
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / f"global_step{STEPS}")  # as if stopped after step 3's checkpoint
    (cut / "checkpoints" / "latest").write_text(f"global_step{SAVE}")
    before = snapshot(cut / "checkpoints" / f"global_step{SAVE}")
    result = run_launcher([*_args(tiny_models, corpus, cut, ds_config), "--resume"], ranks=resume_ranks)
    assert_ok(result)
    return whole, cut, before, result.stdout


def _assert_same_run(whole, cut):
    a, b = {r["step"]: r for r in read_train_log(whole)}, {r["step"]: r for r in read_train_log(cut)}
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(SAVE + 1, STEPS + 1):
        for key in ("train/loss/total", "train/loss/ce", "train/loss/kd", "train/lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)  # float32 sums in another order
    m_a, m_b = (json.loads((o / "metrics.json").read_text()) for o in (whole, cut))
    assert m_b["student_eval_loss"] == pytest.approx(m_a["student_eval_loss"], rel=1e-6)
    return m_b


def test_zero2_two_ranks_resumed_on_one_rank(tiny_models, corpus, tmp_path):
    whole, cut, before, out = _resume_on(tmp_path, tiny_models, corpus, "zero2.json", ranks=2, resume_ranks=1)
    assert "on 2 ranks (micro-batch 2, accumulation 1) on 1 ranks (micro-batch 2, accumulation 2): global batch 4 kept" in out
    assert (cut / "checkpoints" / f"global_step{SAVE}_universal" / "zero").is_dir()
    assert snapshot(cut / "checkpoints" / f"global_step{SAVE}") == before  # the original checkpoint is kept as it was
    assert _assert_same_run(whole, cut)["world_size"] == 1


def test_zero3_one_rank_resumed_on_two_ranks(tiny_models, corpus, tmp_path):
    whole, cut, _, out = _resume_on(tmp_path, tiny_models, corpus, "zero3.json", ranks=1, resume_ranks=2)
    assert "on 1 ranks (micro-batch 2, accumulation 2) on 2 ranks (micro-batch 2, accumulation 1)" in out
    assert "converting checkpoint global_step3 to a universal checkpoint for 2 ranks" in out
    assert _assert_same_run(whole, cut)["world_size"] == 2


def test_resharding_rules():
    """The split of the global batch may change; the global batch, sequence length and seed may not."""
    saved = {"micro_batch_size": 2, "world_size": 2, "gradient_accumulation_steps": 1, "max_seq_length": 32, "seed": 1,
             "max_steps": 6, "lr_schedule": None, "train_batch_size": 4}
    assert check_resume_layout(saved, dict(saved)) is False
    fewer = {**saved, "world_size": 1, "gradient_accumulation_steps": 2}
    assert check_resume_layout(saved, fewer) is True
    assert check_resume_layout(saved, {**saved, "micro_batch_size": 1, "gradient_accumulation_steps": 2}) is True
    assert reshard_position(saved, fewer, 3) == 6  # 3 micro-batches x 2 x 2 ranks = 12 samples = 6 micro-batches of 2
    with pytest.raises(UsageError, match=r"global batch is 4 sequences .* now 2 .* --train_batch_size 4"):
        check_resume_layout(saved, {**saved, "world_size": 1, "train_batch_size": 2})
    for key, value in (("max_seq_length", 64), ("seed", 2)):
        with pytest.raises(UsageError, match=key):
            check_resume_layout(saved, {**saved, key: value, "world_size": 1, "gradient_accumulation_steps": 2})
    with pytest.raises(UsageError, match="whole number of micro-steps"):
        reshard_position(saved, {**saved, "micro_batch_size": 3, "world_size": 1}, 1)  # 4 samples read, micro-steps of 3


def test_train_batch_size_derives_the_accumulation_and_is_checked(tmp_path):
    from fcd_ds.config import TrainArguments
    from fcd_ds.ds_config import resolve_ds_config

    raw = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    args = TrainArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, train_batch_size=32)
    assert resolve_ds_config(raw, args, world_size=2)["gradient_accumulation_steps"] == 4
    assert resolve_ds_config(raw, args, world_size=8)["gradient_accumulation_steps"] == 1
    with pytest.raises(UsageError, match=r"--train_batch_size: 32 is not a multiple of micro-batch 4 x 3 ranks"):
        resolve_ds_config(raw, args, world_size=3)
    fixed = {**raw, "train_batch_size": 16}  # DeepSpeed's own key with the accumulation 'auto': the same rule
    assert resolve_ds_config(fixed, TrainArguments(output_dir=str(tmp_path), per_device_train_batch_size=4), world_size=2)["gradient_accumulation_steps"] == 2
    with pytest.raises(UsageError, match="--train_batch_size and --gradient_accumulation_steps"):
        TrainArguments(output_dir=str(tmp_path), train_batch_size=32, gradient_accumulation_steps=2)


def test_a_changed_global_batch_or_a_streamed_corpus_is_refused_before_any_work(finished_run, corpus, tmp_path, monkeypatch):
    """The finished 1-rank run (micro-batch 2, accumulation 1) resumed with another global batch, and a
    streamed run asked to resume on other ranks: one line each, at plan time, the folder unchanged."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    saved = json.loads((out / "run_config.json").read_text())
    flags = [a for k, v in saved["model"].items() if v not in (None, False) and k in ("teacher", "student_num_layers")
             for a in (f"--{k}", str(v))]
    base = [*flags, "--train_file", str(corpus["train"]), "--validation_file", str(corpus["valid"]), "--max_seq_length", "32",
            "--max_steps", "2", "--max_eval_samples", "4", "--output_dir", str(out), "--resume"]
    r = run_plain([*base, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "global batch is 2 sequences" in r.stderr and "now 4" in r.stderr
    assert snapshot(out) == before
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher sets it for 2 ranks: global batch 1 x 1 x 2, the saved 2
    r = run_plain([*base, "--per_device_train_batch_size", "1", "--streaming"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "a streamed corpus is read in per-rank shards" in r.stderr and "written by 1 ranks, now 2" in r.stderr
    assert snapshot(out) == before

