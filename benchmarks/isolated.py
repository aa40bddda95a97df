"""One benchmark case in its own process: the measurement shared by loss_cost.py, long_sequence.py and
fused_logit_loss.py.

The case runs in a fresh process from a multiprocessing forkserver (torch imported once there), so that
each case's memory is measured alone and an out-of-memory failure is a row of a table, not a crash. It
first gets an address-space limit (RLIMIT_AS) of ``case["mem_limit_gib"]`` above what the process maps,
so that it fails with "out of memory" instead of waking the kernel's OOM killer (a child killed by a
signal is reported too). Time: one warm-up pass, then the median of ``case["repeats"]`` forward+backward
passes (``case.get("slow_repeats", 2)`` when the warm-up took over ``case.get("slow_seconds", 10)`` s).
Peak memory: the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs just before the warm-up;
ru_maxrss where that is not allowed) minus the RSS once the inputs are built.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time

import torch

__all__ = ["measure"]

GIB = 2**30


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _run_case(build, case: dict, conn) -> None:
    """Child process: ``build(case) -> (leaves, closure)``; the closure returns the loss, or a dict of
    named scalars whose ``"loss"`` is backpropagated (all reported as ``values``). Sends a result dict."""
    try:
        torch.randn(512, 512) @ torch.randn(512, 512)  # start the thread pool before the limit (thread stacks)
        resource.setrlimit(resource.RLIMIT_AS, (_proc_kib("VmSize") * 1024 + int(case["mem_limit_gib"] * GIB),) * 2)
        leaves, fn = build(case)
        gc.collect()
        rss0 = _proc_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            method = "VmHWM"
        except OSError:
            method = "ru_maxrss"
        values = {}

        def step() -> float:
            start = time.perf_counter()
            out = fn()
            out = out if isinstance(out, dict) else {"loss": out}
            out["loss"].backward()
            elapsed = time.perf_counter() - start
            values.update({k: v.item() for k, v in out.items()})
            for x in leaves:
                x.grad = None
            return elapsed

        slow = step() > case.get("slow_seconds", 10)  # warm-up
        reps = min(case["repeats"], case.get("slow_repeats", 2)) if slow else case["repeats"]
        timed = [step() for _ in range(reps)]
        hwm = _proc_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send(dict(ms=1e3 * statistics.median(timed), reps=len(timed), mib=(hwm - rss0) / 1024, method=method,
                       threads=torch.get_num_threads(), values=values))
    except Exception as e:  # noqa: BLE001 - any failure is a row of the table
        oom = isinstance(e, MemoryError) or "allocate" in str(e)
        conn.send(dict(error="out of memory" if oom else f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))


def measure(ctx, build, case: dict) -> dict:
    """Run ``build``'s case in a fresh process from ``ctx`` (a forkserver context); returns ``{ms, reps, mib,
    method, threads, values}`` or ``{error}``; a child killed by a signal is recorded, not raised.
    ``build`` must be a module-level function (it is pickled by reference)."""
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_run_case, args=(build, case, send))
    p.start()
    send.close()
    p.join()
    try:
        return recv.recv()  # the child sent its result, or exited without (EOFError)
    except EOFError:
        pass
    if p.exitcode is not None and p.exitcode < 0:
        return dict(error="out of memory (killed)" if p.exitcode == -9 else f"crashed (signal {-p.exitcode})")
    return dict(error=f"failed (exit code {p.exitcode})")
