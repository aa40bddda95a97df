"""fcd_ds.preemption.StopFlag in one process (no process group): SIGTERM and SIGUSR1 are recorded, not
acted on, until the next agreed boundary; the previous handlers come back on restore."""

from __future__ import annotations

import os
import signal

import pytest

from fcd_ds.preemption import REQUEUE_EXIT_CODE, Preempted, StopFlag


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_recorded_and_raised_at_the_boundary(sig, capsys):
    before = signal.getsignal(sig)
    flag = StopFlag().install()
    try:
        flag.check("training")  # nothing received: no stop
        assert flag.agree([False, True]) == (None, [False, True])
        os.kill(os.getpid(), sig)  # the handler runs here, in the main thread; the process goes on
        assert flag.received == sig
        signum, nonfinite = flag.agree([False])
        assert signum == sig and nonfinite == [False]
        with pytest.raises(Preempted, match=f"{signal.Signals(sig).name} received on some rank; stopping during evaluation"):
            flag.check("evaluation")
    finally:
        flag.restore()
    assert signal.getsignal(sig) == before
    err = capsys.readouterr().err
    assert f"rank 0: {signal.Signals(sig).name} received; stopping at the next step boundary" in err
    assert f"exit status {REQUEUE_EXIT_CODE}" in err
