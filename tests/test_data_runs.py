"""Real 2-rank DeepSpeed runs (gloo on CPU) on the data paths: streamed shards and DataLoader workers
each resume from a mid-run checkpoint to the losses of the uninterrupted run; a chat run with
assistant-only loss, per-document attention and a prepared folder made by the run itself reports the
tokens its loss read; a prepared folder of another length is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_ok, read_train_log, run_launcher, snapshot

COMPARED = ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/loss/kd", "train/lr", "train_tokens", "train_loss_tokens")
CHATML = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def common(tiny_models, out: Path, steps: int = 4) -> list:
    return ["--teacher", tiny_models["llama_teacher"], "--student_num_layers", 2, "--kd_weight", 0.5, "--max_seq_length", 32,
            "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 4, "--max_eval_samples", 8, "--learning_rate", 3e-3,
            "--warmup_steps", 1, "--max_steps", steps, "--save_steps", 2, "--output_dir", out]


def assert_resumes_identically(args: list, out: Path, tmp_path: Path, stop: int, end: int) -> None:
    """Run ``args`` for ``end`` steps (a checkpoint every 2), then resume a copy from step ``stop``: the
    later steps' losses and token counts and the final eval equal the uninterrupted run's."""
    assert_ok(run_launcher(args))
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for step in range(stop + 1, end + 1):
        shutil.rmtree(resumed / "checkpoints" / f"global_step{step}", ignore_errors=True)
    (resumed / "checkpoints" / "latest").write_text(f"global_step{stop}")
    state = json.loads((resumed / "checkpoints" / f"global_step{stop}" / "data_state_rank1.json").read_text())
    assert state["position"] == stop  # micro-batches handed out by rank 1 (accumulation 1)
    assert_ok(run_launcher([*[resumed if a == out else a for a in args], "--resume"]))
    original = {r["step"]: r for r in read_train_log(out)}
    after = read_train_log(resumed)[stop:]
    assert [r["step"] for r in after] == list(range(stop + 1, end + 1))
    for row in after:
        for key in COMPARED:
            assert row[key] == pytest.approx(original[row["step"]][key], abs=1e-6), (row["step"], key)
    m_orig, m_res = (json.loads((d / "metrics.json").read_text()) for d in (out, resumed))
    assert m_res["student_eval_loss"] == pytest.approx(m_orig["student_eval_loss"], abs=1e-6)
    assert m_res["train_loss_tokens"] == m_orig["train_loss_tokens"] > 0


def test_streamed_shards_with_workers_resume_exactly(tiny_models, corpus, tmp_path):
    """4 files, 2 per rank, one DataLoader worker per rank; an 8-paragraph corpus, so that the resumed
    steps cross into the second streamed epoch."""
    lines = [line for line in corpus["train"].read_text(encoding="utf-8").splitlines() if line.strip()][:8]
    for k in range(4):
        (tmp_path / f"shard{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[k::4]), encoding="utf-8")
    out = tmp_path / "run"
    args = [*common(tiny_models, out, steps=6), "--train_file", str(tmp_path / "shard*.jsonl"), "--validation_file", corpus["valid"],
            "--streaming", "--dataloader_num_workers", 1]
    assert_resumes_identically(args, out, tmp_path, stop=4, end=6)


def test_dataloader_workers_resume_exactly(tiny_models, corpus, tmp_path):
    out = tmp_path / "run"
    args = [*common(tiny_models, out), "--train_file", corpus["train"], "--validation_file", corpus["valid"],
            "--dataloader_num_workers", 2, "--dataloader_prefetch_factor", 3]
    assert_resumes_identically(args, out, tmp_path, stop=2, end=4)


def test_chat_run_with_assistant_only_loss_per_document_attention_and_a_prepared_folder(tiny_models, tmp_path):
    from fcd_ds.assets import prepare_default_assets

    chats = prepare_default_assets().chat_validation.read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "chat.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    prepared, out = tmp_path / "prepared", tmp_path / "run"
    args = [*common(tiny_models, out), "--train_file", tmp_path / "chat.jsonl", "--chat_template_path", template, "--assistant_only_loss",
            "--per_document_attention", "--dataset_prepared_path", prepared, "--max_steps", 2, "--save_steps", 0]
    assert_ok(run_launcher(args))
    record = json.loads((prepared / "fcd_ds_data.json").read_text())  # made by the run (rank 0), then read by both ranks
    assert record["settings"]["document"]["form"] == "messages" and record["settings"]["document"]["assistant_only_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["train_loss_tokens"] < metrics["train_tokens"] == 2 * 2 * 2 * 32
    rows = read_train_log(out)
    assert [r["train_tokens"] for r in rows] == [128, 256] and rows[-1]["train_loss_tokens"] == metrics["train_loss_tokens"]
    assert rows[0]["train/loss/kd"] > 0 and rows[0]["train/loss/fcd"] > 0
    # the same folder for a run of another length: one line, nothing written
    other = tmp_path / "other"
    before = snapshot(prepared)
    result = run_launcher([*[other if a == out else a for a in args], "--max_seq_length", 64], ranks=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --dataset_prepared_path: {prepared} was prepared with --max_seq_length 32, this run has 64")
    assert not other.exists() and snapshot(prepared) == before
