"""Threads per rank and core binding for the default GPT distillation: which launch is fastest here.

    python benchmarks/threads.py                                # 1 and 2 ranks, every setting; prints, appends to RESULTS.md
    python benchmarks/threads.py --ranks 2 --threads unset --bind off --steps 2 --no_write   # one setting
    python benchmarks/threads.py -- --per_device_train_batch_size 8                          # flags after -- go to the launcher

Each setting is one ``deepspeed --num_gpus R [--bind_cores_to_rank] launchers/distill_gpt.py`` run of the
default job (SmolLM2-135M teacher, 10-block student, BBC News, ZeRO-2, 4 x 128 tokens per rank and step)
shortened to --steps optimizer steps with no initial or periodic evaluation and a final evaluation of
8 held-out blocks, into a temporary folder. Settings: ranks (--ranks) x ``OMP_NUM_THREADS`` per rank
(--threads: 1, 2, or unset, i.e. what DeepSpeed and torch pick) without binding, and, where ``numactl``
is on PATH, ``--bind_cores_to_rank`` once per rank count: DeepSpeed's launcher then overwrites
``OMP_NUM_THREADS`` with physical cores // ranks itself (deepspeed/launcher/launch.py), so a thread
count of ours would not reach the ranks. Without binding the launcher leaves ``OMP_NUM_THREADS`` alone
and torch takes one thread per core its process may run on, in every rank.

Reported per setting, from the run's train_log.jsonl: the median of ``perf/tokens_per_second`` (all
ranks' tokens) over the steps after the first --skip, the achieved FLOP/s (median
``perf/tflops_per_device`` x ranks: the model matmul FLOPs fcd_ds counts) and that as a fraction of this
machine's fp32 matmul rate measured once with 2 threads before any run
(``fcd_ds.runtime.metrics.measure_matmul_tflops``); the training seconds (metrics.json) and the wall seconds of
the deepspeed command (start-up, the final evaluation and checkpoint included); the threads torch used
per rank (the run's own report where it gives one: ``threads_per_rank`` in metrics.json or a threads
line in its output; else ``torch.get_num_threads()`` in a fresh process with the rank's environment,
marked *); and the share of the machine that other processes used during the run (/proc/stat less this
benchmark's children), since a shared machine spoils the comparison. The fastest setting by tokens/s is marked. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launch import REPO  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, publish, utc_stamp  # benchmarks/results.py

__all__ = ["Setting", "settings", "run_setting", "machine_busy_seconds"]

# A run's own report of its torch threads, where fcd_ds prints one ("... x 2 torch thread(s)", "threads per rank: 2").
THREADS_LINE = re.compile(r"(\d+) torch threads?\b|threads per rank\D{0,40}?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Setting:
    """One launch: ``ranks`` local ranks, ``OMP_NUM_THREADS`` = ``threads`` (None: unset), and
    ``--bind_cores_to_rank`` when ``bind``."""

    ranks: int
    threads: int | None
    bind: bool

    @property
    def name(self) -> str:
        omp = "from the launcher" if self.bind else ("unset" if self.threads is None else str(self.threads))
        return f"{self.ranks} rank{'s' if self.ranks > 1 else ''}, OMP_NUM_THREADS {omp}, binding {'on' if self.bind else 'off'}"


def settings(ranks: list[int], threads: list[int | None], bind: str, numactl: bool) -> list[Setting]:
    """Every setting to run, in order: per rank count, each thread count unbound (``bind`` off or both),
    then one bound run (``bind`` on or both, and only when ``numactl`` exists)."""
    out = []
    for r in ranks:
        if bind in ("off", "both"):
            out += [Setting(r, t, False) for t in threads]
        if bind in ("on", "both") and numactl:
            out.append(Setting(r, None, True))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes of this machine have spent busy since boot (/proc/stat: user, nice,
    system, irq, softirq, steal; idle and iowait left out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _rank_env(s: Setting, cores: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if s.threads is not None:
        env["OMP_NUM_THREADS"] = str(s.threads)
    # The runner's ranks import fcd_ds from this checkout even where the installed package points elsewhere.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if s.bind:  # what the bound ranks get from deepspeed/launcher/launch.py
        env["OMP_NUM_THREADS"] = str(cores // s.ranks)
    return env


def _probe_threads(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def run_setting(s: Setting, steps: int, flags: list, work: Path, skip: int, timeout: float) -> dict:
    """Run the default distillation under setting ``s`` for ``steps`` steps into ``work/<setting>``.

    Args:
        flags: extra launcher flags (after the benchmark's own, so they win).
        skip: leading steps left out of the medians (warm-up); all steps are used when no later one exists.
        timeout: seconds before the whole run (its process group) is killed.

    Returns:
        ``{"setting", "status" (exit code, or "timeout"), "wall_s", "other_busy" (share of the machine other
        processes used), "log" (path of the run's output)}`` and, for a finished run, ``"tokens_per_s"``,
        ``"tflops"`` (all ranks), ``"train_s"``, ``"steps_in_median"``, ``"threads"``, ``"threads_from_log"``.
    """
    import psutil

    tag = re.sub(r"[^a-z0-9]+", "_", s.name.lower()).strip("_")
    out, log = work / tag, work / f"{tag}.log"
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    env = _rank_env(s, cores)
    probed = _probe_threads(env)  # before the timed window
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(s.ranks), "--master_port", str(port), *(["--bind_cores_to_rank"] if s.bind else []),
           "launchers/distill_gpt.py", "--output_dir", str(out), "--max_steps", str(steps), "--no_eval_on_start", "--eval_steps", "0",
           "--max_eval_samples", "8", *map(str, flags)]
    print(f"+ {'OMP_NUM_THREADS=' + str(s.threads) + ' ' if s.threads is not None else ''}{shlex.join(cmd)}", flush=True)

    busy0, mine0, start = machine_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner, its launcher and the ranks: a session of our own
            proc.wait()
            status = "timeout"
        except BaseException:  # Ctrl-C reaches only this process: the run's own session would go on
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    wall = time.perf_counter() - start
    others = (machine_busy_seconds() - busy0) - (_children_cpu_seconds() - mine0)
    result = {"setting": s, "status": status, "wall_s": wall, "other_busy": max(others, 0.0) / (wall * (os.cpu_count() or 1)), "log": log}
    text = log.read_text(encoding="utf-8", errors="replace")
    if status != 0 or not (out / "metrics.json").is_file():
        print(f"  failed ({status}); last lines of {log}:\n" + "\n".join(text.splitlines()[-30:]), flush=True)
        return result

    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/tokens_per_second" in r]
    used = [r for r in rows if r["step"] > skip] or rows
    metrics = json.loads((out / "metrics.json").read_text())
    line = THREADS_LINE.search(text)
    logged = metrics.get("threads_per_rank") or (int(line.group(1) or line.group(2)) if line else None)
    result.update(tokens_per_s=statistics.median(r["perf/tokens_per_second"] for r in used),
                  tflops=statistics.median(r["perf/tflops_per_device"] for r in used) * s.ranks,
                  train_s=metrics["train_seconds"], steps_in_median=len(used),
                  threads=logged or probed, threads_from_log=logged is not None)
    for heavy in ("checkpoints", "student"):  # about 1 GB per run
        shutil.rmtree(out / heavy, ignore_errors=True)
    print(f"  {result['tokens_per_s']:.0f} tokens/s, {wall:.0f} s wall", flush=True)
    return result


def _cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
        return model.group(1).strip() if model else platform.processor() or platform.machine()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def _threads_arg(value: str) -> int | None:
    if value == "unset":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a thread count >= 1 or 'unset', got {value!r}")
    return int(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=_threads_arg, nargs="+", default=[1, 2, None], help="OMP_NUM_THREADS per rank: counts and/or 'unset'")
    p.add_argument("--bind", choices=("both", "off", "on"), default="both", help="core binding: both (on only where numactl exists), off, on")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("flags", nargs="*", help="launcher flags (after --)")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))  # this checkout's fcd_ds, as the ranks get it (_rank_env)
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    load = os.getloadavg()[0]
    numactl = shutil.which("numactl") is not None
    notes = []
    if args.bind != "off" and not numactl:
        notes.append("Core binding not measured: `numactl` is not on PATH (`--bind_cores_to_rank` runs it; Debian package `numactl`).")
        print(notes[-1], flush=True)
    if load > 0.5:
        print(f"warning: 1-minute load average {load:.2f} before the start: another job is running and will slow these runs", flush=True)
    matmul = measure_matmul_tflops(threads=2) * 1e12
    print(f"fp32 matmul, 2 threads: {matmul / 1e9:.0f} GFLOP/s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fcd_threads_"))
    results = [run_setting(s, args.steps, args.flags, work, args.skip, args.timeout)
               for s in settings(args.ranks, args.threads, args.bind, numactl)]
    done = [r for r in results if "tokens_per_s" in r]
    best = max(done, key=lambda r: r["tokens_per_s"]) if done else None

    span = f"steps {args.skip + 1}-{args.steps}" if args.steps > args.skip else f"all {args.steps} steps (none after the first {args.skip})"
    lines = [f"Command: `{command_line('threads.py')}`; {_cpu_model()}, {os.cpu_count()} CPUs; measured fp32 matmul {matmul / 1e9:.0f} GFLOP/s "
             f"(2 threads); {args.steps} steps per run of 4 x 128 tokens per rank, medians over {span}; "
             f"1-minute load average {load:.2f} at the start.", ""]
    lines += notes + ([""] if notes else [])
    lines += ["| ranks | OMP_NUM_THREADS | core binding | torch threads per rank | tokens/s | achieved GFLOP/s | fraction of measured matmul "
              "| train s | wall s | machine used by others |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["setting"]
        omp = "set by the launcher" if s.bind else ("unset" if s.threads is None else str(s.threads))
        head = f"| {s.ranks} | {omp} | {'on' if s.bind else 'off'} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} - | failed ({r['status']}) | - | - | - | {r['wall_s']:.0f} | {r['other_busy']:.0%} |")
            continue
        tok = f"**{r['tokens_per_s']:.0f} (fastest)**" if r is best else f"{r['tokens_per_s']:.0f}"
        lines.append(f"{head} {r['threads']}{'' if r['threads_from_log'] else '*'} | {tok} | {r['tflops'] * 1e3:.1f} | "
                     f"{r['tflops'] * 1e12 / matmul:.3f} | {r['train_s']:.1f} | {r['wall_s']:.0f} | {r['other_busy']:.0%} |")
    if any(not r["threads_from_log"] for r in done):
        lines += ["", "\\* from `torch.get_num_threads()` in a fresh process with the rank's environment (the run reported no thread count)."]
    if len(done) > 1:
        slowest = min(done, key=lambda r: r["tokens_per_s"])
        lines += ["", f"Fastest: {best['setting'].name}, {best['tokens_per_s']:.0f} tokens/s "
                      f"({best['tokens_per_s'] / slowest['tokens_per_s']:.2f}x the slowest, {slowest['setting'].name})."]
    publish(lines, write=not args.no_write, heading=f"\n## Threads per rank and core binding — {utc_stamp()}\n\n")
    print(f"(run outputs and logs: {work})")


if __name__ == "__main__":
    main()
