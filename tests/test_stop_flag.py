"""fcd_ds.runtime.preemption.StopFlag in one process (no process group): SIGTERM and SIGUSR1 are recorded, not
acted on, until the next agreed boundary; the previous handlers come back on restore."""

from __future__ import annotations

import os
import signal

import pytest

from fcd_ds.runtime.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, Preempted, StopFlag


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
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
        with pytest.raises(Preempted, match=f"{signal.Signals(sig).name} received on some rank; stopping during evaluation") as caught:
            flag.check("evaluation")
        code = INTERRUPT_EXIT_CODE if sig == signal.SIGINT else REQUEUE_EXIT_CODE  # Ctrl-C is not a request to requeue
        assert caught.value.exit_code == code
    finally:
        flag.restore()
    assert signal.getsignal(sig) == before
    err = capsys.readouterr().err
    assert f"rank 0: {signal.Signals(sig).name} received; stopping at the next step boundary" in err
    assert f"exit status {code}" in err


def test_the_first_signal_decides_and_the_launcher_chain_is_checked_by_pid_and_start_time():
    """Ctrl-C, then DeepSpeed's launcher's SIGTERM to the ranks, is an interrupt. The watched chain is
    alive while each process is the same one (pid and start time) and still the parent of the next; the
    runner-alone case runs for real in tests/test_output_safety.py."""
    import psutil

    from fcd_ds.runtime.preemption import _alive, launcher_chain

    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == signal.SIGINT
    finally:
        flag.restore()
    parent = psutil.Process(os.getppid())
    assert _alive([(parent.pid, parent.create_time())])
    assert not _alive([(parent.pid, parent.create_time() - 1)])  # a reused pid is another process
    assert not _alive([(os.getpid(), psutil.Process().create_time())])  # not this process's parent
    assert launcher_chain() == []  # pytest is not started by deepspeed.launcher.launch: nothing to watch
