"""The one way the benchmarks publish a table: print it, append it to benchmarks/RESULTS.md, and the header
bits every table quotes (the command line, the UTC time, the machine, the measured fp32 matmul rate)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone

from launch import REPO  # benchmarks/launch.py (python puts benchmarks/ on sys.path)

__all__ = ["RESULTS", "command_line", "machine", "matmul_rate", "publish", "utc_stamp"]

RESULTS = REPO / "benchmarks" / "RESULTS.md"


def command_line(script: str) -> str:
    """``python benchmarks/<script> <this process's arguments>``, shell-quoted (``shlex.join``), as the tables
    quote the command that produced them; ``script`` is the file name, e.g. ``"loss_cost.py"``."""
    return shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def utc_stamp() -> str:
    """The current UTC time to the minute, ``"YYYY-MM-DD HH:MM UTC"``, as the tables' headings date them."""
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def machine() -> str:
    """``"<platform.machine()>, <os.cpu_count()> CPU cores"``, e.g. ``"x86_64, 2 CPU cores"``."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores"


def matmul_rate(tflops: float) -> str:
    """``"measured fp32 matmul rate <GFLOP/s> GFLOP/s, 2048 x 2048"`` for ``tflops`` (TFLOP/s) from
    ``fcd_ds.runtime.metrics.measure_matmul_tflops()`` with its defaults (fp32, n = 2048)."""
    return f"measured fp32 matmul rate {tflops * 1e3:.0f} GFLOP/s, 2048 x 2048"


def publish(lines_or_text: str | list[str], *, write: bool, heading: str = "", end: str = "\n") -> str:
    """Print a table and, when ``write``, append it to benchmarks/RESULTS.md (UTF-8).

    Args:
        lines_or_text: the table, as one string or as lines (joined with ``"\\n"``).
        write: append to RESULTS.md; ``False`` (``--no_write``, ``--quick``) only prints.
        heading: written to RESULTS.md just before the table and not printed (e.g. ``"\\n## Title (date)\\n\\n"``).
        end: written after the table, as ``print``'s ``end``.

    Returns:
        The table as printed (without ``heading`` and ``end``).
    """
    text = lines_or_text if isinstance(lines_or_text, str) else "\n".join(lines_or_text)
    print(text)
    if write:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(heading + text + end)
    return text
