"""Helper processes end with the process that started them, however it ends (SIGKILL and OOM included)."""
from __future__ import annotations

import os


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (PR_SET_PDEATHSIG); it exits at once if the parent is
    already gone. Elsewhere a no-op (helpers then end when their pipes close)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def ignore_job_signals() -> None:
    """For helper processes: SLURM signals every process of a job step (SIGUSR1 before the time limit, SIGTERM on
    preemption). The trainer handles them by checkpointing, which needs its helpers; a helper must not die of them
    (their default action). Helpers end with the trainer instead (parent-death signal or the Reaper)."""
    import signal

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


# The reaper: a few lines of Python with no imports beyond the standard library's os/signal/sys (started with -S, so
# it costs milliseconds and megabytes, not a second interpreter with torch). It reads "pid start_time" lines on
# stdin; stdin is a pipe whose only writer is the parent, so EOF means the parent is gone, however it died.
_REAPER = r"""
import os, signal, sys
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # job signals are for the trainer; this ends when the trainer is gone
print("ready", flush=True)
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
watched = [line.split() for line in sys.stdin]
for pid, start in watched:
    if started(int(pid)) == start:  # the same process, not a new one that reused the pid
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
"""


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Reaper:
    """Kills registered processes when this process dies, however it dies (SIGKILL included): for helpers that a
    library starts and that we cannot arm with a parent-death signal, such as megatron-core's checkpoint-writer
    Manager process and the resource tracker it keeps alive. Linux (/proc); elsewhere `watch` is a no-op. The
    helpers themselves are left alone while this process lives."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.proc = None
        if not os.path.isdir("/proc/self"):
            return
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", _REAPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)  # not in the job's process group: it must outlive it
        self.proc.stdout.readline()  # its signal dispositions are set: a job signal from now on cannot kill it
        self.watched: set[int] = set()
        # A forked child (the asynchronous checkpoint writer) would inherit the write end of the reaper's pipe and
        # hold back the end-of-file that tells the reaper this process died: children close their copy.
        os.register_at_fork(after_in_child=self._drop_pipe_in_child)

    def _drop_pipe_in_child(self) -> None:
        # (only while the pipe is open here: once closed, its descriptor number may belong to something else)
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is not None and not stdin.closed:
            _close_quietly(stdin.fileno())

    def watch(self, pid: int) -> None:
        if self.proc is None or pid in self.watched:
            return
        try:
            with open(f"/proc/{pid}/stat") as f:
                start = f.read().rsplit(")", 1)[1].split()[19]
        except OSError:
            return
        try:
            self.proc.stdin.write(f"{pid} {start}\n")
            self.proc.stdin.flush()
        except OSError as e:  # never let a helper's helper stop training
            print(f"warning: process reaper gone ({e}); helper {pid} may outlive a crash", flush=True)
            self.proc = None
            return
        self.watched.add(pid)

    def close(self) -> None:
        """Normal shutdown: the helpers end on their own; the reaper exits without killing anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


