"""Real 2-rank DeepSpeed runs (``deepspeed --num_gpus 2``, gloo on CPU) of tiny GPT-2 and Llama
teachers: ZeRO-2 and ZeRO-3 (teacher really partitioned), checkpoint -> resume equals an uninterrupted
run, the exported student reloads with the same eval loss, TensorBoard events are written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_ok, read_train_log, run_launcher, snapshot
from fcd_ds.config import DS_CONFIG_DIR

EVAL = 16  # held-out blocks (4 per rank per batch x 2 ranks x 2 batches)


def common(corpus, out: Path) -> list:
    return ["--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
            "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 4, "--max_eval_samples", EVAL,
            "--learning_rate", 3e-3, "--warmup_steps", 1, "--output_dir", out]


def reloaded_eval_loss(student_dir: Path, corpus) -> float:
    """Eval loss of the exported student, recomputed in this process on the same held-out blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcd_ds.config import DataArguments
    from fcd_ds.data import TextCorpus
    from fcd_ds.losses import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    data = DataArguments(train_file=str(corpus["train"]), validation_file=str(corpus["valid"]), max_seq_length=32)
    _, valid = TextCorpus(tokenizer, data, "causal_lm").load()
    ids = torch.tensor(valid[:EVAL]["input_ids"])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        total = causal_lm_loss(model(ids).logits, ids, mask, reduction="sum")
    return total.item() / mask[:, 1:].sum().item()


def zero3_json(directory: Path, **extra) -> Path:
    """zero3.json with parameter persistence off, so even tiny parameters are partitioned."""
    cfg = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg.update(extra)
    path = directory / "zero3_tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def numel(model_dir: Path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def assert_teacher_sharded(metrics: dict, teacher_dir: Path) -> None:
    total = numel(teacher_dir)
    shares = metrics["teacher_param_shard_numel_per_rank"]
    assert len(shares) == 2 and sum(shares) >= total
    assert all(s <= 0.52 * total for s in shares), (shares, total)  # each rank holds about half


def gpt2_args(tiny_models, corpus, out: Path, ds_config: Path) -> list:
    """Depth-pruned GPT-2 student (tied embeddings), logit KD on, 4 steps with a checkpoint every 2."""
    return ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--max_steps", 4, "--save_steps", 2,
            "--kd_weight", 0.5, "--deepspeed_config", ds_config, *common(corpus, out)]


@pytest.fixture(scope="module")
def gpt2_zero3_run(tiny_models, corpus, tmp_path_factory):
    """:func:`gpt2_args` with ZeRO-3 student and teacher."""
    root = tmp_path_factory.mktemp("gpt2_zero3")
    out = root / "run"
    result = run_launcher(gpt2_args(tiny_models, corpus, out, zero3_json(root)))
    assert_ok(result)
    return out


def test_zero3_run_learns_shards_the_teacher_and_writes_every_artifact(gpt2_zero3_run, tiny_models, corpus):
    out = gpt2_zero3_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 2 and metrics["zero_stage"] == 3
    assert metrics["student_eval_perplexity"] < metrics["student_eval_perplexity_initial"]
    assert metrics["student_eval_perplexity"] == pytest.approx(math.exp(metrics["student_eval_loss"]))
    assert metrics["train_tokens"] == 4 * 4 * 32 * 2 and metrics["train_tokens_per_second"] > 0
    assert_teacher_sharded(metrics, tiny_models["gpt2_teacher"])
    rows = read_train_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/loss/ce", "train/loss/fcd", "train/fcd/s0_t1/token", "train/fcd/s1_t3/sequence", "train/lr",
                "perf/tokens_per_second", "perf/samples_per_second", "perf/tflops_per_device", "time/teacher_forward",
                "time/student_forward_backward", "time/optimizer_step", "memory/max_allocated_gib"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert all(r["train/loss/kd"] > 0 for r in rows)
    assert rows[0]["train/loss/total"] == pytest.approx(
        rows[0]["train/loss/ce"] + rows[0]["train/loss/fcd"] + 0.5 * rows[0]["train/loss/kd"], rel=1e-5)
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "global_step2").is_dir() and (out / "checkpoints" / "latest").read_text() == "global_step4"
    assert reloaded_eval_loss(out / "student", corpus) == pytest.approx(metrics["student_eval_loss"], abs=1e-4)


def test_resume_from_a_mid_run_checkpoint_continues_identically(gpt2_zero3_run, tiny_models, corpus, tmp_path):
    resumed = tmp_path / "run"
    shutil.copytree(gpt2_zero3_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "global_step4")
    (resumed / "checkpoints" / "latest").write_text("global_step2")
    ds_config = gpt2_zero3_run.parent / "zero3_tiny.json"
    result = run_launcher([*gpt2_args(tiny_models, corpus, resumed, ds_config), "--resume"])
    assert_ok(result)
    original = {r["step"]: r for r in read_train_log(gpt2_zero3_run)}
    after = read_train_log(resumed)[-2:]
    assert [r["step"] for r in after] == [3, 4]
    for row in after:
        for key in ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/loss/kd", "train/lr"):
            assert row[key] == pytest.approx(original[row["step"]][key], abs=1e-6), (row["step"], key)
    m_orig = json.loads((gpt2_zero3_run / "metrics.json").read_text())
    m_res = json.loads((resumed / "metrics.json").read_text())
    assert m_res["student_eval_loss"] == pytest.approx(m_orig["student_eval_loss"], abs=1e-6)
    assert m_res["student_eval_loss_initial"] == m_orig["student_eval_loss_initial"]
    # another global batch (a smaller micro-batch, or fewer ranks with the same accumulation) would change the
    # loss and replay other data, another --max_steps would stretch the LR schedule: each refused before any
    # work, nothing written (another split of the same global batch resumes: tests/test_reshard.py)
    before = snapshot(resumed)
    cases = [(["--per_device_train_batch_size", 2], 2, "the checkpoint's global batch is 8 sequences (micro-batch 4 x accumulation 1 x 2 ranks), now 4"),
             (["--max_steps", 6], 2, "the checkpoint was written with {'max_steps': (4, 6)} (saved, now) (the LR schedule decays over the saved --max_steps"),
             ([], 1, "the checkpoint's global batch is 8 sequences (micro-batch 4 x accumulation 1 x 2 ranks), now 4 (micro-batch 4 x accumulation 1 x 1 ranks); keep it: pass --train_batch_size 8")]
    for extra, ranks, message in cases:
        result = run_launcher([*gpt2_args(tiny_models, corpus, resumed, ds_config), "--resume", *extra], ranks=ranks)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: --resume: {message}"), \
            (errors, result.stdout[-2000:], result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        assert snapshot(resumed) == before


def test_llama_zero3_teacher_is_sharded_and_matches_zero2(tiny_models, corpus, tmp_path):
    """Narrower pretrained student (width 32 vs 64: FCD needs no projection), teacher without LM head
    (KD off). ZeRO-3 with DeepSpeed's activation checkpointing (JSON section) and ZeRO-2 with
    transformers' (--gradient_checkpointing) give the same first-step losses; ZeRO-3 shards the teacher
    over both ranks, ZeRO-2 keeps it whole on each."""
    args = ["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"], "--max_steps", 2,
            "--layer_map", "0:1,1:3@2"]
    ds_ckpt = {"activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False}}
    variants = {3: ["--deepspeed_config", zero3_json(tmp_path, **ds_ckpt)],
                2: ["--deepspeed_config", DS_CONFIG_DIR / "zero2.json", "--gradient_checkpointing"]}
    runs = {}
    for stage, extra in variants.items():
        out = tmp_path / f"zero{stage}"
        assert_ok(run_launcher([*args, *extra, *common(corpus, out)]))
        runs[stage] = out
    metrics = json.loads((runs[3] / "metrics.json").read_text())
    assert_teacher_sharded(metrics, tiny_models["llama_teacher"])
    whole = json.loads((runs[2] / "metrics.json").read_text())["teacher_param_shard_numel_per_rank"]
    assert whole == [numel(tiny_models["llama_teacher"])] * 2
    logs = {stage: read_train_log(out) for stage, out in runs.items()}
    for row3, row2 in zip(logs[3], logs[2], strict=True):  # step 2 equal too: same gradients, FCD's included
        for key in ("train/loss/ce", "train/loss/fcd", "train/fcd/s1_t3/token", "train/fcd/s0_t1/sequence"):
            assert row3[key] == pytest.approx(row2[key], abs=1e-4), (row3["step"], key)
    first = logs[3][0]
    assert "train/loss/kd" not in first
    assert first["train/loss/fcd"] == pytest.approx(
        (first["train/fcd/s0_t1/token"] + first["train/fcd/s0_t1/sequence"]
         + 2 * (first["train/fcd/s1_t3/token"] + first["train/fcd/s1_t3/sequence"])) / 3, rel=1e-5)
    assert reloaded_eval_loss(runs[3] / "student", corpus) == pytest.approx(metrics["student_eval_loss"], abs=1e-4)


def test_fresh_student_from_a_config_file_at_zero3(tiny_models, corpus, tmp_path):
    """--student_config: a randomly initialised student built already partitioned (ZeRO-3), 1 step; with
    --attn_implementation eager for both models (recorded in run_config.json)."""
    config = json.loads((tiny_models["llama_student"] / "config.json").read_text())
    config["num_hidden_layers"] = 3
    path = tmp_path / "student_config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert_ok(run_launcher(["--teacher", tiny_models["llama_teacher"], "--student_config", path, "--max_steps", 1,
                            "--deepspeed_config", zero3_json(tmp_path), "--attn_implementation", "eager", *common(corpus, out)]))
    assert json.loads((out / "run_config.json").read_text())["model"]["attn_implementation"] == "eager"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layer_map"] == "0:0@1,1:2@1,2:3@1"  # uniform, 3 student blocks onto 4
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 32
    assert reloaded_eval_loss(out / "student", corpus) == pytest.approx(metrics["student_eval_loss"], abs=1e-4)


def test_teacher_offload_shards_the_teacher_under_a_zero2_student(tiny_models, corpus, tmp_path):
    """--teacher_offload cpu: the teacher becomes a ZeRO-3 engine with offload_param (partitioned over
    both ranks) while the student trains at ZeRO-2; same first-step losses as the whole teacher."""
    base = ["--teacher", tiny_models["llama_teacher"], "--student", tiny_models["llama_student"], "--max_steps", 1,
            "--deepspeed_config", DS_CONFIG_DIR / "zero2.json"]
    runs = {}
    for name, extra in (("whole", []), ("offload", ["--teacher_offload", "cpu"])):
        runs[name] = tmp_path / name
        assert_ok(run_launcher([*base, *extra, *common(corpus, runs[name])]))
    metrics = json.loads((runs["offload"] / "metrics.json").read_text())
    assert_teacher_sharded(metrics, tiny_models["llama_teacher"])
    assert len(metrics["peak_host_memory_gib_per_rank"]) == 2 and min(metrics["peak_host_memory_gib_per_rank"]) > 0.1
    whole = json.loads((runs["whole"] / "metrics.json").read_text())
    assert whole["teacher_param_shard_numel_per_rank"] == [numel(tiny_models["llama_teacher"])] * 2
    first = {name: read_train_log(out)[0] for name, out in runs.items()}
    for key in ("train/loss/ce", "train/loss/fcd"):
        assert first["offload"][key] == pytest.approx(first["whole"][key], abs=1e-5), key
