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
