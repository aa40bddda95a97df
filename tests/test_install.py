"""A non-editable install (``pip install --target``, no repository on the path) runs the launchers as
modules from any directory: ``deepspeed --module fcd_ds.launchers.distill_gpt``; the DeepSpeed JSON, the
SLURM template and multinode.sh ship with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, free_port


def test_an_installed_fcd_ds_runs_the_launchers_as_modules_from_any_directory(tiny_models, corpus, tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (target / "fcd_ds" / "__editable__").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = tmp_path / "elsewhere"  # no launchers/, no ds_configs/ here
    where.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import fcd_ds, fcd_ds.launchers as l, fcd_ds.config as c; "
                            "print(fcd_ds.__file__); print(l.path('slurm/distill.sbatch')); print(l.path('multinode.sh')); print(c.DS_CONFIG_DIR)"],
                           capture_output=True, text=True, env=env, cwd=where)
    assert probe.returncode == 0, probe.stderr[-2000:]
    lines = probe.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines  # the installed copy, not the repository
    assert sorted(p.name for p in (target / "fcd_ds" / "recipes").glob("*.yaml")) == sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    for name in ("distill_gpt", "distill_bert", "distill_roberta", "finetune_teacher"):
        helped = subprocess.run([sys.executable, "-m", f"fcd_ds.launchers.{name}", "--help"], capture_output=True, text=True, env=env, cwd=where)
        assert helped.returncode == 0 and "--output_dir" in helped.stdout, (name, helped.stderr[-2000:])
    out = tmp_path / "run"
    run = subprocess.run(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "--module", "fcd_ds.launchers.distill_gpt",
                          "--teacher", str(tiny_models["gpt2_teacher"]), "--student_num_layers", "2", "--train_file", str(corpus["train"]),
                          "--validation_file", str(corpus["valid"]), "--max_seq_length", "32", "--per_device_train_batch_size", "2",
                          "--max_steps", "1", "--max_eval_samples", "4", "--output_dir", str(out)],
                         capture_output=True, text=True, env=env, cwd=where, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and (out / "student" / "model.safetensors").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["train"]["deepspeed_config"].startswith(str(target))  # the JSON that shipped with the install
