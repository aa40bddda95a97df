"""A real two-node SLURM cluster on this one machine, for tests of ``launchers/slurm/distill.sbatch``.

Debian's slurmctld + two slurmd (``-N n1``, ``-N n2``: its build has MULTIPLE_SLURMD) + munge, installed
with apt-get when ``sinfo`` is missing, configured in a fresh state folder with ports of their own, and
stopped by PID: only the daemons started here (munged only if it was not already running). Every client
command runs with ``SLURM_CONF`` pointing at this cluster's slurm.conf (``cluster.env``).

    python tests/slurm_cluster.py /tmp/slurm-state     # start one by hand; Ctrl-C or SIGTERM stops it

(see ../shared/SLURM_LOCAL.md for what was seen on this machine)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["SlurmCluster", "SlurmUnavailable", "install_slurm"]

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MUNGE_PID = Path("/run/munge/munged.pid")


class SlurmUnavailable(RuntimeError):
    """The SLURM packages are missing and could not be installed (the message says why)."""


def install_slurm() -> None:
    """Install Debian's slurmctld, slurmd, slurm-client and munge when ``sinfo`` is missing (about 10 s)."""
    if all(shutil.which(c) for c in ("sinfo", "sbatch", "slurmctld", "slurmd", "munged")):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale package lists: update once, then try again
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(lines[-3:])}")


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports (slurmd ports are a range: ``Port=A-B``)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 60999:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def _alive(pid: int, comm: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except OSError:
        return False


class SlurmCluster:
    """slurmctld + slurmd n1 + slurmd n2 (one CPU each) in ``state``; ``start()`` then ``stop()``."""

    NODES = ("n1", "n2")

    def __init__(self, state: Path):
        self.state = Path(state)
        self.conf = self.state / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.munged_pid: int | None = None  # set only when this cluster started munged
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {**env, "SLURM_CONF": str(self.conf)}

    # --- lifecycle ---------------------------------------------------------------------------------
    def write_conf(self) -> None:
        for sub in ("state", "spool/n1", "spool/n2", "log"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        s = self.state
        ctld_port, node_port = _free_ports(1), _free_ports(len(self.NODES))
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""\
ClusterName=fcdci
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=60
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={node_port}-{node_port + 1} CPUs=1 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        if MUNGE_PID.exists():
            try:
                if _alive(int(MUNGE_PID.read_text().split()[0]), "munged"):
                    return  # someone else's munged: use it, never stop it
            except ValueError:
                pass
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True, text=True)
        for _ in range(50):
            if MUNGE_PID.exists() and MUNGE_PID.read_text().strip():
                self.munged_pid = int(MUNGE_PID.read_text().split()[0])
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but wrote no PID file")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.state / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> "SlurmCluster":
        install_slurm()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs as their users (these tests need root)")
        self.write_conf()
        self._start_munge()
        self._daemon("slurmctld", ["slurmctld", "-D"])
        for node in self.NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.state}/log")
            states = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            if len(states) == len(self.NODES) and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the nodes did not become idle in {timeout} s; see {self.state}/log")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons started here (and munged if started here)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition", "debug"], check=False, timeout=30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run(["squeue", "-h", "-t", "R,CG"], check=False, timeout=30).stdout.strip():
                time.sleep(0.5)
        for name in [n for n in self.procs if n != "slurmctld"] + ["slurmctld"]:
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.munged_pid is not None and _alive(self.munged_pid, "munged"):
            os.kill(self.munged_pid, signal.SIGTERM)
            self.munged_pid = None

    # --- client commands ---------------------------------------------------------------------------
    def run(self, cmd: list, check: bool = True, timeout: float = 60, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{cmd} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, args: list, cwd=None, env: dict | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, jobid: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``{}`` once the controller has forgotten the job)."""
        result = self.run(["scontrol", "show", "job", "-o", jobid], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def in_queue(self, jobid: int) -> bool:
        return bool(self.run(["squeue", "-h", "-j", jobid], check=False).stdout.strip())

    def wait(self, jobid: int, timeout: float = 600, poll: float = 1.0) -> dict[str, str]:
        """Poll ``squeue -h -j`` until the job leaves the queue, then return ``scontrol show job``."""
        deadline = time.monotonic() + timeout
        while self.in_queue(jobid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} still queued after {timeout} s: {self.job(jobid).get('JobState')}")
            time.sleep(poll)
        return self.job(jobid)


if __name__ == "__main__":
    import sys

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # a background job of a script starts with SIGINT ignored
    cluster = SlurmCluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C or SIGTERM stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
