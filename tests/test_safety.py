"""Nothing planted runs: a pickle planted in a checkpoint folder, and a model folder's own code, are
refused in one line and never executed (a marker file they would write never appears); flags are exact."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import run_launcher, run_plain, snapshot


class _Payload:
    """Unpickling this object writes ``marker`` (what an attacker's pickle would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _plant(path: Path, marker: Path) -> None:
    import torch

    torch.save({"python": _Payload(marker)}, path)  # a file torch.load(weights_only=False) would execute


@pytest.mark.parametrize("target", ["rng_state_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(finished_run, tiny_models, corpus, tmp_path, target):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "marker"
    planted = out / "checkpoints" / "global_step2" / target
    _plant(planted, marker)
    with open(planted, "rb") as f:  # it is a real payload: the unsafe load would run it
        assert b"write_text" in f.read()
    before = snapshot(out)
    result = run_launcher(["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--train_file", corpus["train"],
                           "--validation_file", corpus["valid"], "--max_seq_length", 32, "--per_device_train_batch_size", 2,
                           "--max_steps", 2, "--max_eval_samples", 4, "--output_dir", out, "--resume"], ranks=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --resume: {planted} holds ") and "which fcd_ds does not load" in errors[0]
    assert not marker.exists() and "Traceback" not in result.stderr
    assert snapshot(out) == before
    pickle.dumps(_Payload(marker))  # the payload class itself is fine to build: only loading it runs code


def _evil_teacher(tiny_models, tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """The tiny GPT-2 teacher with an ``auto_map`` to a configuration module that writes a marker when imported."""
    teacher = tmp_path / f"teacher_{model_type}"
    shutil.copytree(tiny_models["gpt2_teacher"], teacher)
    marker = tmp_path / f"marker_{model_type}"
    (teacher / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n"
        f"from transformers import GPT2Config\nclass EvilConfig(GPT2Config):\n    model_type = {model_type!r}\n")
    config = json.loads((teacher / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "configuration_evil.EvilConfig"}
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher, marker


def test_a_model_folders_own_code_never_runs_even_when_stdin_says_yes(tiny_models, corpus, tmp_path):
    """A type only the folder's code defines is refused in one line (no prompt, though stdin says y); a
    known type with an auto_map loads transformers' own class; the folder's code runs in neither."""
    import subprocess
    import sys

    from conftest import LAUNCHER, REPO

    teacher, marker = _evil_teacher(tiny_models, tmp_path, "evil_gpt")
    args = [sys.executable, str(LAUNCHER), "--teacher", str(teacher), "--student_num_layers", "2", "--train_file", str(corpus["train"]),
            "--validation_file", str(corpus["valid"]), "--max_seq_length", "32", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(args, cwd=REPO, input="y\ny\n", capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: --teacher: cannot load a model config"), result.stderr[-2000:]
    assert errors[0].endswith("it ships its own code, which runs only with --trust_remote_code (pass it if you trust the folder)"), errors[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "[y/N]" not in result.stdout + result.stderr  # no prompt
    from fcd_ds import defaults
    from fcd_ds.config import parse_args
    from fcd_ds.plan import plan_run

    known, marker = _evil_teacher(tiny_models, tmp_path, "gpt2")
    plan = plan_run(*parse_args([str(a) for a in args[2:]] + ["--teacher", str(known)], defaults.GPT.flags), defaults.GPT)
    assert type(plan.teacher_config).__name__ == "GPT2Config" and not marker.exists()


@pytest.mark.parametrize("flag,closest", [("--resum", "--resume"), ("--max_step", "--max_steps"), ("--fcd_wieght", "--fcd_weight")])
def test_flags_are_exact_and_unknown_ones_name_the_closest(flag, closest, tmp_path):
    result = run_plain([flag, "1", "--output_dir", tmp_path / "out"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and f"closest: {closest}" in errors[0], result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3 and not (tmp_path / "out").exists()
