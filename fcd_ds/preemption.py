"""Preemption and numeric faults: one stop flag set by signal handlers, agreed over every rank.

A cluster that preempts a job (SLURM's ``--signal=TERM@<s>`` before the time limit, ``scontrol
requeue``, Lightning's SIGUSR1 convention) signals some or all of its ranks. Each rank's handler only
records the signal; the ranks then agree at the next boundary (the end of an optimizer step, of an
evaluation batch, before export) with one all-reduce (MAX), so that all of them stop at the same point,
save the same checkpoint and exit with :data:`REQUEUE_EXIT_CODE`, which ``launchers/slurm/distill.sbatch``
turns into ``scontrol requeue``. As NVIDIA NeMo's ``PreemptionCallback`` (a signal handler that sets a
flag, agreed across ranks at the step boundary) and Lightning's ``SLURMEnvironment`` (SIGUSR1 requeue).

A training loss that turns NaN or Inf is agreed the same way (:meth:`StopFlag.agree` takes the
non-finite flags of the step's loss terms), and the run stops without saving, so ``latest`` still names
the last good checkpoint; the process exits with :data:`NONFINITE_EXIT_CODE`.
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

from .distributed import all_reduce_host

__all__ = ["REQUEUE_EXIT_CODE", "NONFINITE_EXIT_CODE", "STOP_SIGNALS", "Preempted", "StopFlag"]

REQUEUE_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" (a checkpoint was saved)
NONFINITE_EXIT_CODE = 3  # a loss turned NaN or Inf; the last good checkpoint is kept
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised at an agreed boundary once any rank received a stop signal. ``where`` names the loop
    (``train``, ``eval``, ``startup``, ``export``)."""

    def __init__(self, where: str, signum: int | None):
        name = signal.Signals(signum).name if signum else "a stop signal"
        super().__init__(f"{name} received on some rank; stopping during {where}")
        self.where = where


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
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(f"rank {rank}: {signal.Signals(signum).name} received; stopping at the next step boundary "
                  "(checkpoint, then exit status %d)" % REQUEUE_EXIT_CODE, file=sys.stderr, flush=True)
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
