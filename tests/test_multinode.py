"""launchers/multinode.sh: DeepSpeed's hostfile launcher behind a check of the hostfile. Bad hostfiles
get one ``error:`` line and exit 2; the command line for 2 nodes x 8 GPUs; a real run on a one-host
hostfile (DeepSpeed's local launcher, 2 ranks), rerun to show that --auto_resume continues it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from conftest import REPO, free_port, read_train_log

SCRIPT = REPO / "launchers" / "multinode.sh"


def multinode(hostfile, *flags, dry: bool = False) -> subprocess.CompletedProcess:
    """Run the script with a free MASTER_PORT (kept as ``result.args_port``); DeepSpeed's ssh check off
    (its runner tries ssh even for one host)."""
    port = str(free_port())
    env = {**os.environ, "FCD_DS_DRY_RUN": "1" if dry else "0", "MASTER_PORT": port, "DEEPSPEED_ARGS": "--no_ssh_check"}
    result = subprocess.run(["bash", str(SCRIPT), str(hostfile), "launchers/distill_gpt.py", *map(str, flags)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    result.args_port = port
    return result


@pytest.mark.parametrize("text, message", [
    ("# only a comment\n\n", "names no host"),
    ("node1\n", "line 1 of"),
    ("node1 slots=0\n", "line 1 of"),
    (None, "does not exist"),
])
def test_a_bad_hostfile_is_one_error_line(text, message, tmp_path):
    hostfile = tmp_path / "hostfile"
    if text is not None:
        hostfile.write_text(text)
    result = multinode(hostfile, "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: hostfile: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_command_line_for_two_nodes_of_eight_gpus(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8  # first: the master\ngpu-b slots=8\n")
    result = multinode(hostfile, "--deepspeed_config", "ds_configs/zero3.json", "--output_dir", "/shared/out/run1", dry=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "hosts: gpu-a gpu-b (2 nodes, 16 ranks)"
    words = lines[1].split()
    assert words[:5] == ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "gpu-a"]
    assert words[5:9] == ["--master_port", result.args_port, "--no_ssh_check", "--force_multi"]
    assert words[9:] == ["launchers/distill_gpt.py", "--deepspeed_config", "ds_configs/zero3.json", "--output_dir", "/shared/out/run1", "--auto_resume"]
    # the module form (an installed fcd_ds): DeepSpeed's --module before the module name
    port = str(free_port())
    module = subprocess.run(["bash", str(SCRIPT), str(hostfile), "--module", "fcd_ds.launchers.distill_gpt", "--output_dir", "/shared/out/run1"],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "FCD_DS_DRY_RUN": "1", "MASTER_PORT": port, "DEEPSPEED_ARGS": ""})
    assert module.returncode == 0, module.stderr
    assert module.stdout.strip().splitlines()[1].split()[5:] == ["--master_port", port, "--force_multi", "--module", "fcd_ds.launchers.distill_gpt",
                                                                 "--output_dir", "/shared/out/run1", "--auto_resume"]
    refused = multinode(hostfile, "--overwrite_output_dir", dry=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --overwrite_output_dir:")


def test_a_one_host_hostfile_runs_and_a_rerun_auto_resumes(tiny_models, corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    flags = ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--max_steps", 2,
             "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
             "--per_device_train_batch_size", 2, "--max_eval_samples", 8, "--output_dir", out]
    first = multinode(hostfile, *flags)
    assert first.returncode == 0, first.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    # the same command again: the run is complete, --auto_resume resumes it at step 2 and exports again
    again = multinode(hostfile, *flags)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [r["step"] for r in read_train_log(out)] == [1, 2]
    assert json.loads((out / "metrics.json").read_text())["student_eval_loss"] == pytest.approx(metrics["student_eval_loss"], abs=1e-6)


def _remote_words(user_args: list[str]) -> list[str]:
    """What each host's shell makes of the launcher's flags on DeepSpeed's pdsh path: DeepSpeed's own
    PDSHRunner.parse_user_args, joined with spaces as pdsh sends them, read back by a real bash."""
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    line = " ".join(PDSHRunner(SimpleNamespace(user_args=user_args, user_script="x", launcher_args=""), "").parse_user_args())
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout
    return out.split("\0")[:-1]


def test_flags_reach_every_remote_host_unchanged_and_nothing_in_them_runs(tmp_path):
    import shlex

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    marker = tmp_path / "ran"
    flags = ["--output_dir", f"{tmp_path}/out dir/$(touch {marker})", "--train_file", f"`touch {marker}`.jsonl",
             "--validation_file", f"it's \"q\" \\ $HOME;touch {marker}", "--text_column", "plain", "--run_name", "a|b&c>d"]
    result = multinode(hostfile, *flags, dry=True)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[1])  # the runner's argv, as the dry run prints it
    user_args = argv[argv.index("launchers/distill_gpt.py") + 1:]
    assert _remote_words(user_args) == [*flags, "--auto_resume"]
    assert not marker.exists()
    # without the quoting (the flags as DeepSpeed's runner would get them unquoted) the remote shell runs them
    _remote_words(flags[:-2])
    assert marker.exists()
