"""launchers/slurm/distill.sbatch against a real two-node SLURM cluster on this machine (tests/slurm_cluster.py:
Debian's slurmctld + 2 slurmd + munge, installed with apt-get when missing; skipped only where they cannot
be installed). A tiny 2-rank distillation (one rank per node) runs to COMPLETED; the same run requeued
mid-training resumes from its checkpoint and gives the uninterrupted run's losses, also when requeued
onto one node (the global batch kept through --train_batch_size, the ZeRO-3 states re-partitioned); with a stand-in
launcher, ranks signalled before the time limit make the template requeue the job itself, and a plain
scancel stays a cancel; the dry run prints the 2 nodes x 8 GPUs command; outside SLURM the template says
so in one line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_train_log
from slurm_cluster import SlurmCluster, SlurmUnavailable

TEMPLATE = REPO / "launchers" / "slurm" / "distill.sbatch"
STEPS, SAVE_STEPS = 40, 10
LOSS_KEYS = ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/loss/kd", "train/lr")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """A fresh two-node cluster (n1, n2: one CPU each) for this module; its daemons stopped at the end.
    Skipped, with the reason printed, only where the SLURM packages cannot be installed."""
    try:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as exc:
        reason = f"no SLURM here: {exc}"
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:  # shown even without -rs
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\ntests/test_slurm.py skipped: {reason}")
        pytest.skip(reason)
    yield c
    c.stop()


def run_args(tiny_models, corpus, out: Path, ds_config: Path) -> list:
    """Tiny GPT-2 distillation (test_distill_runs' gpt2_args shape) long enough to be requeued mid-run."""
    return ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", 2, "--max_steps", STEPS,
            "--save_steps", SAVE_STEPS, "--kd_weight", 0.5, "--deepspeed_config", ds_config,
            "--train_file", corpus["train"], "--validation_file", corpus["valid"], "--max_seq_length", 32,
            "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 4, "--max_eval_samples", 16,
            "--learning_rate", 3e-3, "--warmup_steps", 1, "--output_dir", out]


def submit(cluster, log: Path, args: list) -> int:
    """sbatch -N 2 the template from the repository root (one rank per node)."""
    return cluster.sbatch(["-N", 2, "-o", log, "-D", REPO, "--time", 30, TEMPLATE, "launchers/distill_gpt.py", *args],
                          env={"PYTHON": sys.executable})


def steps_logged(out: Path) -> int:
    try:
        return len(read_train_log(out))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
        return 0


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_models, corpus):
    root = tmp_path_factory.mktemp("slurm_runs")
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # tiny parameters partitioned too
    (root / "zero3_tiny.json").write_text(json.dumps(ds))
    return root


@pytest.fixture(scope="module")
def job_a(cluster, shared, tiny_models, corpus):
    """The uninterrupted run: submitted, waited for, its scontrol record and log returned."""
    out, log = shared / "a", shared / "a.log"
    jobid = submit(cluster, log, run_args(tiny_models, corpus, out, shared / "zero3_tiny.json"))
    info = cluster.wait(jobid, timeout=900)
    return {"id": jobid, "info": info, "out": out, "log": log.read_text() if log.exists() else ""}


def test_two_node_job_completes_and_exports_the_student(job_a):
    from transformers import AutoModelForCausalLM

    info, out, log = job_a["info"], job_a["out"], job_a["log"]
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, log[-4000:])
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    header = f"fcd_ds: job {job_a['id']} attempt 1 (SLURM_RESTART_COUNT=0): 2 node(s) x 1 rank(s) on n1 n2, master 127.0.0.1:"
    assert header in log
    assert "fcd_ds: the ranks exited with status 0" in log
    assert f'"steps": {STEPS}' in log  # rank 0's closing summary line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["world_size"] == 2 and metrics["zero_stage"] == 3
    assert [r["step"] for r in read_train_log(out)] == list(range(1, STEPS + 1))
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.n_layer == 2
    port = re.search(r"master 127\.0\.0\.1:(\d+)", log).group(1)
    assert int(port) == 20000 + job_a["id"] % 10000
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_requeued_job_resumes_and_matches_the_uninterrupted_run(cluster, job_a, shared, tiny_models, corpus):
    out, log = shared / "b", shared / "b.log"
    jobid = submit(cluster, log, run_args(tiny_models, corpus, out, shared / "zero3_tiny.json"))
    deadline = time.monotonic() + 600
    while steps_logged(out) < 3:
        assert cluster.in_queue(jobid), log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training steps logged"
        time.sleep(0.2)
    cluster.run(["scontrol", "requeue", jobid])
    while (state := cluster.job(jobid).get("JobState")) != "PENDING":  # BeginTime ~2 min away: start it now
        assert state in ("RUNNING", "COMPLETING", "REQUEUED"), state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    cluster.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"])
    info = cluster.wait(jobid, timeout=900)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1"
    # two attempts in one log (--open-mode=append): the first saved and exited 75, the second finished
    assert len(re.findall(rf"fcd_ds: job {jobid} attempt \d", text)) == 2
    assert f"fcd_ds: job {jobid} attempt 2 (SLURM_RESTART_COUNT=1)" in text
    first, second = text.split(f"fcd_ds: job {jobid} attempt 2")
    assert "fcd_ds: the ranks exited with status 75" in first
    assert f"fcd_ds: checkpoint saved; SLURM has already requeued job {jobid}" in first
    assert "fcd_ds: the ranks exited with status 0" in second and f'"steps": {STEPS}' in second
    # stopped mid-run, and every step logged exactly once with the uninterrupted run's losses
    saved_at = [int(m) for m in re.findall(r"global_step(\d+)", " ".join(p.name for p in (out / "checkpoints").iterdir()))]
    assert any(s % SAVE_STEPS for s in saved_at) or "preempted:" in first, saved_at
    rows, reference = read_train_log(out), {r["step"]: r for r in read_train_log(job_a["out"])}
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in LOSS_KEYS:
            assert row[key] == pytest.approx(reference[row["step"]][key], abs=1e-6), (row["step"], key)
    m_a = json.loads((job_a["out"] / "metrics.json").read_text())
    m_b = json.loads((out / "metrics.json").read_text())
    assert m_b["steps"] == STEPS and m_b["world_size"] == 2
    assert m_b["student_eval_loss"] == pytest.approx(m_a["student_eval_loss"], abs=1e-6)


def test_job_requeued_onto_fewer_nodes_resumes_with_the_same_global_batch(cluster, shared, tiny_models, corpus):
    """Submitted with --nodes=1-2 and --train_batch_size: the first attempt runs on 2 nodes (accumulation 1),
    is requeued while a node is drained, and the second attempt runs on 1 node (accumulation 2): its ZeRO-3
    checkpoint is converted once to a universal checkpoint (the original kept), the same global samples
    are read, and every step logs the uninterrupted 2-node run's losses. CE + KD: FCD's sequence relation
    spans one micro-step's samples over the ranks, which a split into more micro-batches changes (README)."""
    reference, out, log = shared / "fewer_reference", shared / "fewer", shared / "fewer.log"
    extra = ["--loss", "ce+kd", "--train_batch_size", 8]  # micro-batch 4 x 2 ranks x accumulation 1
    ref = submit(cluster, shared / "fewer_reference.log", [*run_args(tiny_models, corpus, reference, shared / "zero3_tiny.json"), *extra])
    assert cluster.wait(ref, timeout=900).get("JobState") == "COMPLETED", (shared / "fewer_reference.log").read_text()[-4000:]
    args = [*run_args(tiny_models, corpus, out, shared / "zero3_tiny.json"), *extra]
    jobid = cluster.sbatch(["--nodes=1-2", "-o", log, "-D", REPO, "--time", 30, TEMPLATE, "launchers/distill_gpt.py", *args],
                           env={"PYTHON": sys.executable})
    deadline = time.monotonic() + 600
    try:
        while steps_logged(out) < SAVE_STEPS + 2:  # past the first checkpoint
            assert cluster.in_queue(jobid), log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no training steps logged"
            time.sleep(0.2)
        assert cluster.job(jobid)["NumNodes"] == "2"
        cluster.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=fcd_ds test: fewer nodes"])
        cluster.run(["scontrol", "requeue", jobid])
        while (state := cluster.job(jobid).get("JobState")) != "PENDING":
            assert state in ("RUNNING", "COMPLETING", "REQUEUED"), state
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        cluster.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"])
        info = cluster.wait(jobid, timeout=900)
    finally:
        cluster.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-4000:])
    first, second = text.split(f"fcd_ds: job {jobid} attempt 2")
    assert "2 node(s) x 1 rank(s)" in first and "1 node(s) x 1 rank(s) on n1" in second
    assert "converting checkpoint global_step" in second and "global batch 8 kept" in second
    assert "on 2 ranks (micro-batch 4, accumulation 1) on 1 ranks (micro-batch 4, accumulation 2)" in second
    names = {p.name for p in (out / "checkpoints").iterdir() if p.is_dir()}
    converted = [n for n in names if n.endswith("_universal")]
    assert len(converted) == 1 and converted[0].removesuffix("_universal") in names  # the original is kept beside it
    rows, expected = read_train_log(out), {r["step"]: r for r in read_train_log(reference)}
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("train/loss/total", "train/loss/ce", "train/loss/kd", "train/lr"):
            assert row[key] == pytest.approx(expected[row["step"]][key], rel=1e-5, abs=1e-6), (row["step"], key)
    m_a, m_b = (json.loads((o / "metrics.json").read_text()) for o in (reference, out))
    assert m_b["world_size"] == 1 and m_b["student_eval_loss"] == pytest.approx(m_a["student_eval_loss"], rel=1e-5)


FAKE_LAUNCHER = """\
import json, os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))  # as fcd_ds: checkpoint saved, requeue me
(out / f"rank{os.environ['RANK']}.attempt{attempt}").write_text(json.dumps({**{k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}))
if attempt == 0:
    time.sleep(300)
"""


def submit_fake(cluster, tmp_path) -> tuple[int, Path, Path]:
    """The template around a stand-in launcher that exits 75 on SIGTERM in its first attempt (no DeepSpeed: seconds)."""
    launcher, out, log = tmp_path / "fake_launcher.py", tmp_path / "out", tmp_path / "job.log"
    launcher.write_text(FAKE_LAUNCHER)
    out.mkdir()
    jobid = cluster.sbatch(["-N", 2, "-o", log, "-D", REPO, TEMPLATE, launcher, "--output_dir", out], env={"PYTHON": sys.executable})
    deadline = time.monotonic() + 120
    while not all((out / f"rank{r}.attempt0").exists() for r in (0, 1)):  # both ranks up, handlers installed
        assert cluster.in_queue(jobid) and time.monotonic() < deadline, log.read_text() if log.exists() else jobid
        time.sleep(0.2)
    return jobid, out, log


def test_ranks_signalled_before_the_time_limit_make_the_template_requeue_the_job(cluster, tmp_path):
    """--signal=TERM@<s> reaches the ranks only (as scancel --signal=TERM does): they exit 75 and the
    template itself runs scontrol requeue, exit 0; the second attempt gets SLURM_RESTART_COUNT=1."""
    jobid, out, log = submit_fake(cluster, tmp_path)
    cluster.run(["scancel", "--signal=TERM", jobid])
    deadline = time.monotonic() + 120
    while cluster.job(jobid).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    cluster.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"])
    info = cluster.wait(jobid, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", (info, text)
    assert f"fcd_ds: checkpoint saved; requeued job {jobid} (it resumes with --auto_resume)" in text
    assert f"fcd_ds: job {jobid} attempt 2 (SLURM_RESTART_COUNT=1)" in text
    for attempt in (0, 1):
        ranks = [json.loads((out / f"rank{r}.attempt{attempt}").read_text()) for r in (0, 1)]
        assert [(e["RANK"], e["LOCAL_RANK"], e["CROSS_RANK"]) for e in ranks] == [("0", "0", "0"), ("1", "0", "1")]
        for env in ranks:
            assert (env["WORLD_SIZE"], env["LOCAL_SIZE"], env["CROSS_SIZE"], env["MASTER_ADDR"]) == ("2", "1", "2", "127.0.0.1")
            assert env["MASTER_PORT"] == str(20000 + jobid % 10000)
            assert env["argv"] == ["--output_dir", str(out), "--auto_resume"]


def test_scancel_is_not_undone_by_the_requeue(cluster, tmp_path):
    """A plain scancel also signals the batch shell; the ranks still exit 75, but the job stays cancelled."""
    jobid, out, log = submit_fake(cluster, tmp_path)
    cluster.run(["scancel", jobid])
    info = cluster.wait(jobid, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, text)
    assert "fcd_ds: the ranks exited with status 75" in text
    assert f"fcd_ds: checkpoint saved; job {jobid} is COMPLETING (cancelled or out of time), not requeued" in text


def dry_run(cluster, *extra, **env) -> subprocess.CompletedProcess:
    fake = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_NTASKS": "16",
            "SLURM_NTASKS_PER_NODE": "8", "FCD_DS_DRY_RUN": "1", **env}
    return subprocess.run(["bash", TEMPLATE, "launchers/distill_gpt.py", "--deepspeed_config", "ds_configs/zero3.json",
                           "--output_dir", "out/run 1", "--bf16", *extra],
                          cwd=REPO, env={**cluster.env, **fake}, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_two_nodes_by_eight_gpus_command(cluster):
    result = dry_run(cluster)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    # gpu01 is no node of this cluster: MASTER_ADDR falls back to the name; the port comes from the job id
    assert exports == {"MASTER_ADDR": "gpu01", "MASTER_PORT": "24242", "WORLD_SIZE": "16", "LOCAL_SIZE": "8",
                       "CROSS_SIZE": "2", "PYTHONUNBUFFERED": "1"}
    assert lines[0] == ("fcd_ds: job 4242 attempt 1 (SLURM_RESTART_COUNT=0): 2 node(s) x 8 rank(s) on gpu01 gpu02, "
                        "master gpu01:24242")
    argv = shlex.split(lines[-1])
    assert argv[:6] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=0", "--wait=120"]
    assert argv[6:8] == ["bash", "-c"]
    assert "RANK=$SLURM_PROCID" in argv[8] and "LOCAL_RANK=$SLURM_LOCALID" in argv[8] and "WORLD_SIZE=$SLURM_NTASKS" in argv[8]
    assert argv[9:] == ["fcd_ds_rank", "python3", "launchers/distill_gpt.py", "--deepspeed_config", "ds_configs/zero3.json",
                        "--output_dir", "out/run 1", "--bf16", "--auto_resume"]
    # the per-rank environment, as srun's tasks 9 (node 1, local 1) would get it
    task = subprocess.run(["bash", "-c", argv[8], "x", "bash", "-c", 'echo "$RANK $LOCAL_RANK $CROSS_RANK $WORLD_SIZE"'],
                          env={**os.environ, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "16"},
                          capture_output=True, text=True)
    assert task.stdout.split() == ["9", "1", "1", "16"]
    # the module form (an installed fcd_ds): each rank runs python3 -m NAME
    fake = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_NTASKS": "16",
            "SLURM_NTASKS_PER_NODE": "8", "FCD_DS_DRY_RUN": "1"}
    module = subprocess.run(["bash", TEMPLATE, "--module", "fcd_ds.launchers.distill_gpt", "--output_dir", "out/run 1"],
                            cwd=REPO, env={**cluster.env, **fake}, capture_output=True, text=True, timeout=60)
    assert module.returncode == 0, module.stderr
    assert shlex.split(module.stdout.splitlines()[-1])[9:] == ["fcd_ds_rank", "python3", "-m", "fcd_ds.launchers.distill_gpt",
                                                                "--output_dir", "out/run 1", "--auto_resume"]
    # GPUS_PER_NODE without the matching --ntasks-per-node: one line naming the sbatch flags
    bad = dry_run(cluster, GPUS_PER_NODE="4")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: GPUS_PER_NODE=4 but the job has --ntasks-per-node=8: submit with --ntasks-per-node=4 --gpus-per-node=4"]
    # a start flag that would fight --auto_resume (--overwrite_output_dir would wipe the checkpoint at each requeue)
    bad = dry_run(cluster, "--overwrite_output_dir")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --overwrite_output_dir: this template passes --auto_resume so that a requeued job resumes; "
        "drop --overwrite_output_dir (another --output_dir starts afresh)"]


@pytest.mark.parametrize("where", ["no SLURM_JOB_ID", "no srun or scontrol on PATH"])
def test_outside_slurm_the_template_says_how_to_submit(where, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if where != "no SLURM_JOB_ID":
        env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", PATH=str(tmp_path))  # an empty folder
    result = subprocess.run(["/bin/bash", TEMPLATE, "launchers/distill_gpt.py"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "sbatch" in lines[0] and "deepspeed --hostfile" in lines[0]
