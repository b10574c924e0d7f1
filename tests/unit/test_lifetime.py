"""Helper processes and the job's signals: the reaper ends registered helpers when their owner is SIGKILLed, and
helpers shielded from SLURM's signals (and the reaper itself) survive them while the owner lives."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

OWNER = r"""
import subprocess, sys, time
from megatron_spark.lifetime import Reaper
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
reaper = Reaper()
reaper.watch(helper.pid)
print(helper.pid, reaper.proc.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_the_reaper_kills_registered_helpers_when_their_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    helper, reaper = map(int, owner.stdout.readline().split())
    try:
        # the job's signals do not touch the reaper, and it leaves the helper alone while the owner lives
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(reaper, sig)
        time.sleep(0.5)
        assert psutil.pid_exists(helper) and psutil.Process(reaper).status() != psutil.STATUS_ZOMBIE
        owner.kill()  # SIGKILL: no handler, no atexit in the owner
        owner.wait()
        assert _gone(helper, 5.0) and _gone(reaper, 5.0)
    finally:
        for pid in (helper, reaper):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_checkpoint_writer_manager_survives_the_jobs_signals():
    """SLURM sends SIGUSR1 (before the time limit) and SIGTERM (preemption) to every process of the step; the
    Manager megatron-core's writer needs must still serve the checkpoint those signals ask for."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from megatron_spark import compat
    from megatron_spark.lifetime import ignore_job_signals

    saved = fa._results_queue
    fa._results_queue = None
    try:
        pid = compat.checkpoint_writer_queue(initializer=ignore_job_signals)
        assert pid is not None and compat.checkpoint_writer_queue() == pid  # started once
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(pid, sig)
        time.sleep(0.5)
        fa._results_queue.put("still served")
        assert fa._results_queue.get(timeout=5) == "still served"
    finally:
        manager = fa._results_queue._manager
        fa._results_queue = saved
        manager.shutdown()
