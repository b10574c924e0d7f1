"""The one way this package starts local ranks: `torchrun_command` (a free port each time; SLURM jobs, whose nodes
must agree on a port, derive theirs from the job id in slurm/*.sbatch). And the self-relaunch of single-command
tools under torchrun (the verification tools need several ranks).

The workers report the tool's exit code through a file rather than their own exit status, so an expected
"verification failed" (exit 1) prints the tool's report, not torchrun's crash dump.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

_EXIT_FILE = "SPARK_TOOL_EXIT_FILE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, target: list[str], *, port: int | None = None, max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` ranks on this node; `target` is what each rank runs
    (['-m', 'module', args...] or ['script.py', args...]). `max_restarts`: torchrun restarts every rank that many
    times after a failure (the trainer resumes from its last complete checkpoint)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(port or free_port())]
    if max_restarts:
        cmd += ["--max-restarts", str(max_restarts)]
    return cmd + list(target)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run `megatron-spark argv` as `nproc` local ranks (gloo on CPU, NCCL on GPU); returns the tool's exit code."""
    with tempfile.NamedTemporaryFile("w+", suffix=".exit") as f:
        env = dict(os.environ, **{_EXIT_FILE: f.name})
        # Library deprecation chatter from every rank buries the report; the tool's own errors still print.
        env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning")
        cmd = torchrun_command(nproc, ["-m", "megatron_spark.cli", *argv])
        rc = subprocess.call(cmd, env=env)
        text = open(f.name).read().strip()
    return int(text) if rc == 0 and text else rc


def worker_exit(code: int, rank: int) -> int:
    """Called by every worker with the tool's exit code: rank 0 records it; workers then exit 0."""
    path = os.environ.get(_EXIT_FILE)
    if path is None:
        return code
    if rank == 0:
        with open(path, "w") as f:
            f.write(str(code))
    return 0
