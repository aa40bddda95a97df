"""Nothing of the user's is lost: --overwrite_output_dir removes only what the manifest records, never a
folder by name or through a symlink; a running run holds its folder (a second one is refused naming
it); a read-only or full output folder ends in one line before training, and a disk that fills during a
checkpoint ends in one line with ``latest`` naming the complete one. Real 1-rank DeepSpeed runs; the
read-only and the full folders are a bind mount and a tmpfs in a private mount namespace (unshare -m)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LAUNCHER, REPO, assert_ok, free_port, run_launcher, snapshot
from fcd_ds.output_dir import LOCK_FILE, MANIFEST, lock_holder, read_manifest


@pytest.fixture
def flags(tiny_models, corpus):
    return ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--train_file", corpus["train"],
            "--validation_file", corpus["valid"], "--max_seq_length", 32, "--per_device_train_batch_size", 2,
            "--max_eval_samples", 4]


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_the_manifest_names_what_the_run_wrote_and_overwrite_removes_only_that(finished_run, flags, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert sorted(read_manifest(out)) == ["checkpoints", "metrics.json", "run_config.json", "runs", "student", "train_log.jsonl", "wandb"]
    mode = (out / "student" / "model.safetensors").stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, oct(mode)  # readable by the group and others, as the umask allows (safetensors wrote 0600)
    (out / "model").mkdir()  # the user's own folders and files beside the run, under names fcd_ds also uses elsewhere
    (out / "model" / "weights.bin").write_bytes(b"the user's model")
    (out / "runs_old").mkdir()
    (out / "runs_old" / "events").write_text("mine")
    (out / "notes.txt").write_text("mine")
    mine = {k: v for k, v in snapshot(out).items() if k.split("/")[0] in ("model", "runs_old", "notes.txt")}
    old_metrics = (out / "metrics.json").read_text()
    result = run_launcher([*flags, "--max_steps", 1, "--output_dir", out, "--overwrite_output_dir"], ranks=1)
    assert_ok(result)
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine  # every user file as it was
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1 and (out / "metrics.json").read_text() != old_metrics
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step1"
    assert not (out / "checkpoints" / "global_step2").exists()  # the earlier run's checkpoint: recorded, so removed


def test_a_user_folder_or_a_symlink_under_a_run_name_is_refused_even_with_overwrite(finished_run, flags, tmp_path):
    from conftest import run_plain

    out = tmp_path / "run"
    out.mkdir()
    (out / "student").mkdir()  # not written by fcd_ds: no manifest names it
    (out / "student" / "mine.txt").write_text("mine")
    before = snapshot(out)
    result = run_plain([*flags, "--output_dir", out, "--overwrite_output_dir"])
    assert result.returncode == 2 and _errors(result) == [
        f"error: --output_dir: {out / 'student'} was not written by fcd_ds (fcd_ds_manifest.json does not name it), and this run "
        "writes student there; move it, or pick another --output_dir"]
    assert snapshot(out) == before

    run = tmp_path / "linked"
    shutil.copytree(finished_run, run)
    target = tmp_path / "scratch_checkpoints"
    (run / "checkpoints").rename(target)
    (run / "checkpoints").symlink_to(target)  # a recorded name that is now a symlink
    before_target = snapshot(target)
    result = run_plain([*flags, "--output_dir", run, "--overwrite_output_dir"])
    assert result.returncode == 2 and _errors(result) == [
        f"error: --output_dir: {run / 'checkpoints'} is a symlink, which fcd_ds never writes, and this run writes checkpoints there; "
        "move it, or pick another --output_dir"]
    assert "Traceback" not in result.stderr and snapshot(target) == before_target and (run / "checkpoints").is_symlink()


def _start(args: list, ranks: int = 1) -> subprocess.Popen:
    """A launcher under ``deepspeed`` in a process group of its own (as a shell job: Ctrl-C reaches the group)."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(LAUNCHER), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_step(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    log = out / "train_log.jsonl"
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.5)


def _group_left(pgid: int) -> list[str]:
    """Processes still alive in the process group (what would outlive the launch)."""
    ps = subprocess.run(["ps", "-o", "pid=,pgid=,stat=,args=", "-e"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if line.split()[1] == str(pgid) and not line.split()[2].startswith("Z")]


def _wait_gone(pgid: int, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while _group_left(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _group_left(pgid)


def test_a_second_run_on_a_running_folder_is_refused_then_ctrl_c_checkpoints_and_nothing_outlives_it(flags, tmp_path):
    out = tmp_path / "run"
    first = _start([*flags, "--max_steps", 100000, "--logging_steps", 1, "--output_dir", out], ranks=2)
    try:
        _wait_for_step(out, first)
        holder = lock_holder(out)
        assert holder is not None and holder.startswith(f"pid ")
        assert (out / LOCK_FILE).is_file() and (out / MANIFEST).is_file()
        # a second run on the same folder, even one told to overwrite it, is refused naming the running one
        second = run_launcher([*flags, "--max_steps", 1, "--output_dir", out, "--overwrite_output_dir"], ranks=1)
        assert second.returncode == 2 and _errors(second) == [
            f"error: --output_dir: {out} is in use by a running fcd_ds run ({holder}); wait for it to end, or pick another --output_dir"]
        assert first.poll() is None  # the running one is untouched
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal: every process of the job gets SIGINT
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert _wait_gone(first.pid) == []
    assert "Traceback" not in stderr.replace(_runner_traceback(stderr), ""), stderr[-4000:]
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and "SIGINT received on some rank" in interrupted[0] and "checkpoint saved, exit status 130" in interrupted[0]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / "trainer_state.json").is_file()
    assert lock_holder(out) is None  # released with the process that held it


def _runner_traceback(stderr: str) -> str:
    """DeepSpeed's own runner (bin/deepspeed) answers Ctrl-C with a KeyboardInterrupt traceback of its
    ``result.wait()`` (deepspeed/launcher/runner.py 0.19.8, no handler on the local path): the part of
    ``stderr`` that is that traceback, so the test can require that no fcd_ds process printed one."""
    start = stderr.find("Traceback (most recent call last):")
    end = stderr.find("\nKeyboardInterrupt", start)
    if start < 0 or end < 0:
        return ""
    block = stderr[start:end + len("\nKeyboardInterrupt")]
    return block if "deepspeed/launcher/runner.py" in block and "fcd_ds" not in block and "launchers/" not in block else ""


def test_sigint_to_the_deepspeed_runner_alone_stops_every_rank_with_a_checkpoint(flags, tmp_path):
    out = tmp_path / "run"
    proc = _start([*flags, "--max_steps", 100000, "--logging_steps", 1, "--output_dir", out], ranks=2)
    try:
        _wait_for_step(out, proc)
        os.kill(proc.pid, signal.SIGINT)  # the runner only: DeepSpeed's local runner forwards nothing
        proc.communicate(timeout=120)
        left = _wait_gone(proc.pid)  # launch.py and the ranks: each rank sees its launcher gone and stops
    finally:
        for line in _group_left(proc.pid):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == []
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["step"] >= 1 and lock_holder(out) is None


def _in_mount_namespace(setup: str, args: list, ranks: int = 1) -> subprocess.CompletedProcess:
    """``deepspeed <launcher> args`` after ``setup`` (mount commands) in a private mount namespace."""
    cmd = shlex.join(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(LAUNCHER), *map(str, args)])
    return subprocess.run(["unshare", "-m", "bash", "-c", f"set -e; {setup}; exec {cmd}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_a_read_only_output_folder_is_one_line_before_training(flags, tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "readonly"
    src.mkdir()
    mnt.mkdir()
    (src / "mine.txt").write_text("mine")
    result = _in_mount_namespace(f"mount --bind -o ro {src} {mnt}", [*flags, "--max_steps", 1, "--output_dir", mnt / "run"])
    assert result.returncode == 2 and _errors(result) == [f"error: --output_dir: cannot write {mnt / 'run'} (Read-only file system); "
                                                          "pick a writable --output_dir"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in src.iterdir()) == ["mine.txt"]


def test_a_full_disk_is_refused_before_training_and_a_disk_filling_mid_run_keeps_latest(flags, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # 1 MiB: less than one checkpoint and the export of the ~0.14M-parameter student
    result = _in_mount_namespace(f"mount -t tmpfs -o size=1m tmpfs {mnt}", [*flags, "--max_steps", 1, "--output_dir", mnt / "run"])
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --output_dir: {mnt / 'run'} has ") and "GiB free, a checkpoint and the export of the" in errors[0]
    # 4 MiB: room for the first checkpoint, not for the second (--save_steps 1 keeps both)
    result = _filling_run(mnt, tmp_path, flags)
    errors = _errors(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --output_dir: writing checkpoint global_step")
    assert "No space left on device" in errors[0] or "MiB left on the file system" in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    after = tmp_path / "after"
    latest = (after / "checkpoints" / "latest").read_text().strip()
    assert f"latest still names the complete {latest}" in errors[0]
    assert (after / "checkpoints" / latest / "trainer_state.json").is_file()
    assert not list((after / "checkpoints").glob("*.tmp"))  # the half-written one was removed, freeing its space


def _filling_run(mnt: Path, tmp_path: Path, flags: list) -> subprocess.CompletedProcess:
    """A run on a 4 MiB tmpfs that saves every step; what the folder holds afterwards is copied to tmp_path/after."""
    run = shlex.join(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), str(LAUNCHER),
                      *map(str, [*flags, "--max_steps", 6, "--save_steps", 1, "--output_dir", mnt / "run"])])
    script = f"set -e; mount -t tmpfs -o size=4m tmpfs {mnt}; status=0; {run} || status=$?; cp -r {mnt}/run {tmp_path}/after; exit $status"
    return subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_truncated_optimizer_state_is_one_line_before_resuming(finished_run, flags, tmp_path):
    from conftest import run_plain

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    optim = next((out / "checkpoints" / "global_step2").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:
        f.truncate(optim.stat().st_size // 3)  # a copy cut short
    before = snapshot(out)
    result = run_plain([*flags, "--max_steps", 2, "--output_dir", out, "--resume"])
    errors = _errors(result)
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --resume: {optim} is damaged or truncated (")
    assert errors[0].endswith("no older checkpoint is left, or start a new run")
    assert snapshot(out) == before
