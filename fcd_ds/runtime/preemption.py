"""Preemption and numeric faults: one stop flag set by signal handlers, agreed over every rank.

A cluster that preempts a job (SLURM's ``--signal=TERM@<s>`` before the time limit, ``scontrol
requeue``, Lightning's SIGUSR1 convention) signals some or all of its ranks. Each rank's handler only
records the signal; the ranks then agree at the next boundary (the end of an optimizer step, of an
evaluation batch, before export) with one all-reduce (MAX), so that all of them stop at the same point,
save the same checkpoint and exit with :data:`REQUEUE_EXIT_CODE`, which ``launchers/slurm/distill.sbatch``
turns into ``scontrol requeue``. As NVIDIA NeMo's ``PreemptionCallback`` (a signal handler that sets a
flag, agreed across ranks at the step boundary) and Lightning's ``SLURMEnvironment`` (SIGUSR1 requeue).

SIGINT (Ctrl-C, or ``kill -INT``) is handled the same way, and the run exits with
:data:`INTERRUPT_EXIT_CODE` (130, the shell's 128 + SIGINT) instead, so that the SLURM template does not
requeue a run its user stopped. DeepSpeed's local runner (``deepspeed`` without a hostfile,
deepspeed/launcher/runner.py 0.19.8) installs no signal handler: a SIGINT or SIGTERM sent to it alone
ends it and leaves ``deepspeed.launcher.launch`` and the ranks running. :meth:`StopFlag.watch_launcher`
closes that gap: each rank watches the chain of processes that launched it, and once its launcher is
gone it stops as if signalled (checkpoint, exit), so no rank outlives the launch.

A training loss that turns NaN or Inf is agreed the same way (:meth:`StopFlag.agree` takes the
non-finite flags of the step's loss terms), and the run stops without saving, so ``latest`` still names
the last good checkpoint; the process exits with :data:`NONFINITE_EXIT_CODE`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from .distributed import all_reduce_host

__all__ = ["REQUEUE_EXIT_CODE", "INTERRUPT_EXIT_CODE", "NONFINITE_EXIT_CODE", "STOP_SIGNALS", "Preempted", "StopFlag", "launcher_chain"]

REQUEUE_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" (a checkpoint was saved)
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C (a checkpoint was saved; not requeued)
NONFINITE_EXIT_CODE = 3  # a loss turned NaN or Inf; the last good checkpoint is kept
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
WATCH_INTERVAL_S = 1.0  # how often a rank looks whether its launcher is still there


class Preempted(Exception):
    """Raised at an agreed boundary once any rank received a stop signal. ``where`` names the loop
    (``train``, ``eval``, ``startup``, ``export``)."""

    def __init__(self, where: str, signum: int | None):
        name = signal.Signals(signum).name if signum else "a stop signal"
        super().__init__(f"{name} received on some rank; stopping during {where}")
        self.where = where
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """:data:`INTERRUPT_EXIT_CODE` after SIGINT (the user stopped the run), else :data:`REQUEUE_EXIT_CODE`."""
        return INTERRUPT_EXIT_CODE if self.signum == signal.SIGINT else REQUEUE_EXIT_CODE


def launcher_chain(pid: int | None = None) -> list[tuple[int, float]]:
    """The DeepSpeed launch above ``pid`` (default this process): ``[(pid, create_time), ...]`` of its
    parent ``deepspeed.launcher.launch`` and of the process that started that (the ``deepspeed`` runner,
    or the remote shell of a pdsh launch). Empty when the parent is anything else (srun and torchrun
    forward signals themselves; a plain process may outlive its shell on purpose, as under nohup).
    Uses psutil (a DeepSpeed dependency)."""
    import psutil

    try:
        parent = psutil.Process(pid).parent()
        if parent is None or not any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return []
        chain = [(parent.pid, parent.create_time())]
        grand = parent.parent()
        if grand is not None and grand.pid != 1:
            chain.append((grand.pid, grand.create_time()))
        return chain
    except psutil.Error:
        return []


def _alive(chain: list[tuple[int, float]]) -> bool:
    """Whether every process of ``chain`` still runs (the same process: pid and start time) and is still
    the parent of the next one down."""
    import psutil

    child = os.getpid()
    for pid, created in chain:
        try:
            p = psutil.Process(pid)
            if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE or psutil.Process(child).ppid() != pid:
                return False
        except psutil.Error:
            return False
        child = pid
    return True


class StopFlag:
    """Signal handlers that record a stop request on this rank, and the collective that agrees on it.

    ``install()`` sets the handlers (main thread only, as Python requires); ``restore()`` puts the
    previous ones back. :meth:`check` raises :class:`Preempted` on every rank once any rank got a
    signal. Without a process group the decision is this rank's own.

    Args:
        signals: the signals that request a stop (default SIGTERM and SIGUSR1).
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> "StopFlag":
        for sig in self.signals:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started with SIGINT ignored (a shell script's background job): keep it so, as Python does
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def watch_launcher(self, chain: list[tuple[int, float]] | None = None, interval_s: float = WATCH_INTERVAL_S) -> "StopFlag":
        """Start a daemon thread that records a stop (as SIGINT: not requeued) once a process of ``chain``
        (default :func:`launcher_chain`) has exited, e.g. the ``deepspeed`` runner after a SIGINT sent to
        it alone."""
        chain = launcher_chain() if chain is None else chain
        if not chain:
            return self

        def watch():
            while _alive(chain):
                time.sleep(interval_s)
            if self.received is None:
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(f"rank {rank}: the process that launched it (pid {chain[-1][0]}) has exited; stopping at the next step "
                      f"boundary (checkpoint, then exit status {INTERRUPT_EXIT_CODE})", file=sys.stderr, flush=True)
                self.received = signal.SIGINT

        threading.Thread(target=watch, name="fcd_ds-launcher-watch", daemon=True).start()
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # the first signal decides (Ctrl-C, then DeepSpeed's launcher's SIGTERM: an interrupt)
            rank = dist.get_rank() if dist.is_initialized() else 0
            code = INTERRUPT_EXIT_CODE if signum == signal.SIGINT else REQUEUE_EXIT_CODE
            print(f"rank {rank}: {signal.Signals(signum).name} received; stopping at the next step boundary "
                  f"(checkpoint, then exit status {code})", file=sys.stderr, flush=True)
            self.received = signum

    def agree(self, nonfinite: list[bool] = ()) -> tuple[int | None, list[bool]]:
        """One all-reduce (MAX) of this rank's stop request and ``nonfinite`` flags. Collective.

        Returns:
            ``(signum, nonfinite_any)``: the signal number received on some rank (the highest, None when
            none), and for each entry of ``nonfinite`` whether it was true on any rank.
        """
        flags = torch.tensor([self.received or 0, *map(float, nonfinite)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = all_reduce_host(flags, op=dist.ReduceOp.MAX)
        signum = int(flags[0].item()) or None
        return signum, [bool(v) for v in flags[1:].tolist()]

    def check(self, where: str) -> None:
        """Raise :class:`Preempted` on every rank when any rank received a stop signal. Collective.

        Raises:
            Preempted: some rank received one of ``signals``.
        """
        signum, _ = self.agree()
        if signum:
            raise Preempted(where, signum)
