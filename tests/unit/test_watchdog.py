"""The watchdogs on their own (the e2e test kills and hangs real ranks: tests/e2e/test_train.py)."""
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_spark.watchdog import NonFiniteGuard, NonFiniteUpdates


@pytest.mark.slow
def test_a_step_past_its_deadline_dumps_every_thread_and_exits():
    code = textwrap.dedent("""
        import threading, time
        from megatron_spark.watchdog import StepWatchdog
        def stuck_in_a_collective():
            time.sleep(60)
        threading.Thread(target=lambda: time.sleep(60), name="helper", daemon=True).start()
        w = StepWatchdog(1.0)
        w.arm(); time.sleep(0.2); w.arm()   # re-armed: the deadline counts from the last arm
        stuck_in_a_collective()
    """)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    took = time.time() - t0
    assert p.returncode == 1 and took < 20, (p.returncode, took)
    assert "Timeout (0:00:01)!" in p.stderr and "stuck_in_a_collective" in p.stderr
    assert p.stderr.count("Thread 0x") >= 2  # every thread, not only the main one


@pytest.mark.slow
def test_a_disarmed_watchdog_stays_quiet():
    code = ("import time\nfrom megatron_spark.watchdog import StepWatchdog\nw = StepWatchdog(0.5)\nw.arm()\n"
            "w.disarm()\ntime.sleep(1.5)\nprint('finished')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == "finished" and "Timeout" not in p.stderr


def test_non_finite_updates_stop_the_run_only_in_a_row():
    g = NonFiniteGuard(limit=3)
    g.record([1, 1], step=1)
    g.record([0, 0], step=2)  # a clean step resets the count
    g.record([1, 0], step=3)  # so does an applied update after a skipped one
    g.record([1, 1], step=4)
    resumed = NonFiniteGuard(limit=3)
    resumed.load_state_dict(g.state_dict())  # (saved with the checkpoint: a resumed run counts on)
    for guard in (g, resumed):
        with pytest.raises(NonFiniteUpdates, match=r"training.max_nonfinite_updates': 4 updates in a row.*step 5"):
            guard.record([1, 1], step=5)
    assert g.total == 7
    never = NonFiniteGuard(limit=0)
    for s in range(10):
        never.record([1, 1], step=s)


def test_a_signal_asks_to_stop_and_the_writing_rank_leaves_the_requeue_marker(tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's preemption notice) only notes the request; stopping after a step writes the marker that
    slurm/train.sbatch requeues on, on the announcing rank only. The budget counts optimizer steps."""
    import os
    import signal

    from megatron_spark.watchdog import StepBudget, StopRequest

    marker = tmp_path / "stopped"
    monkeypatch.setenv("SPARK_STOP_MARKER", str(marker))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        quiet, writer = StopRequest(announce=False), StopRequest(announce=True)
        writer.install()
        assert not writer.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert writer.requested and not quiet.requested
        quiet.stop_after(3)
        assert not marker.exists()
        writer.stop_after(3)
        assert marker.read_text() == "3"
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert not StepBudget(None).spent(10**6)
    assert not StepBudget(4).spent(3) and StepBudget(4).spent(4)
