"""The one way the benchmarks run a launcher: ``deepspeed --num_gpus N launchers/<name>.py`` as a
subprocess from the repository root, timed, its metrics.json read back."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["REPO", "launch", "spawn"]

REPO = Path(__file__).resolve().parents[1]


def launch(launcher: str, out: Path, flags: list, num_gpus: int, *, reuse: bool = False) -> tuple[dict, float]:
    """Run ``launchers/<launcher>.py`` with ``flags`` into ``out`` (``--overwrite_output_dir`` when it exists).

    Args:
        reuse: return the metrics of a run that already finished in ``out`` (its metrics.json) instead of
            running again, so that an interrupted benchmark resumes; its wall time is then nan.

    Returns:
        ``(metrics.json as a dict, wall seconds of the deepspeed command)``.

    Raises:
        subprocess.CalledProcessError: the launcher failed.
    """
    if reuse and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text()), float("nan")
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), f"launchers/{launcher}.py", "--output_dir", str(out),
           *(["--overwrite_output_dir"] if out.exists() else []), *map(str, flags)]
    print("+", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start


def spawn(launcher: str, flags: list, ranks: int, *, prefix=None, timeout: float = 3600) -> tuple[list, float]:
    """Start ``ranks`` processes of ``launcher`` (a path from the repository root) on this machine with the
    environment DeepSpeed reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), as
    launchers/slurm/distill.sbatch does per node, without the deepspeed runner.

    Args:
        prefix: ``prefix(rank) -> str``, shell text run before ``exec`` of that rank (e.g. joining a cgroup).
        timeout: seconds for the whole run; on a timeout or a failed rank every rank is killed (the others
            would wait in a collective).

    Returns:
        ``(exit statuses by rank ("timeout" for a rank stopped at the limit), wall seconds)``.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, launcher, *map(str, flags)]
    print(f"+ [{ranks} rank(s)] {shlex.join(argv)}", flush=True)
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = f"{prefix(rank) if prefix else ''}exec {shlex.join(argv)}"
        procs.append(subprocess.Popen(["sh", "-c", cmd], cwd=REPO, env=env))
    start = time.perf_counter()
    codes: list = [None] * ranks
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        failed = any(c not in (None, 0) for c in codes)
        if failed or time.perf_counter() - start > timeout:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    codes[i] = "timeout" if not failed else p.wait()
        time.sleep(0.2)
    return codes, time.perf_counter() - start
