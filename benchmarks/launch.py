"""The one way the benchmarks run a launcher: ``deepspeed --num_gpus N launchers/<name>.py`` as a
subprocess from the repository root, timed, its metrics.json read back."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

__all__ = ["REPO", "launch"]

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
