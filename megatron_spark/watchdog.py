"""The training loop's guards: a step that never finishes, updates that would write non-finite weights, a stop
asked for by a signal, and the optimizer-step budget (`SparkTrainer.run` asks them after each step).

- `StepWatchdog`: re-armed at the start of every step; if the step (with its checkpoint) has not finished within
  `training.hang_timeout_s`, the process prints every thread's Python stack (faulthandler: "Timeout (h:mm:ss)!",
  then each thread, the main one last) and exits with status 1. Every rank of a hung collective does the same, so
  the launcher sees a failure at once (and `--max-restarts` resumes from the last checkpoint) instead of the job
  holding its allocation until the time limit. faulthandler's timer runs in C, outside the GIL: it fires even
  when the main thread is stuck inside a collective.
- `NonFiniteGuard`: counts updates skipped for a non-finite loss or gradient (`Policy.train_step` skips them, so
  the weights, and any checkpoint of them, stay finite) and stops the run after `training.max_nonfinite_updates`
  in a row.
- `StopRequest`: SIGTERM / SIGUSR1 (SLURM's preemption notice, `scancel`) asks to finish the current step, write a
  checkpoint and exit cleanly; the ranks agree on the step (a collective), and the writing rank leaves the marker
  file slurm/train.sbatch requeues on (`SPARK_STOP_MARKER`).
- `StepBudget`: `training.max_optimizer_steps` (equal-budget ablations): the run ends after the step that reaches it.
- `FaultPlan`: faults that cannot be caused on demand otherwise -- a rank that hangs or dies at a given step, a
  non-finite loss at given steps -- given to the trainer by the e2e tests (through `SPARK_TEST_FAULTS`, which only
  the entry point reads); the trainer's default plan is empty.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional


class StepWatchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=sys.stderr, exit=True)

    def disarm(self) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()


class NonFiniteUpdates(RuntimeError):
    """Raised on every rank alike when too many updates in a row were skipped as non-finite."""


class NonFiniteGuard:
    """Stateful (saved with the checkpoint): a resumed run counts the streak on from where it was."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def record(self, skipped: list[int], step: int) -> None:
        """This step's updates in order, 1 for each one skipped as non-finite: an applied update ends a streak."""
        for s in skipped:
            self.total += s
            self.in_row = self.in_row + 1 if s else 0
        if self.limit and self.in_row >= self.limit:
            raise NonFiniteUpdates(
                f"config field 'training.max_nonfinite_updates': {self.in_row} updates in a row had a non-finite "
                f"loss or gradient (the last at step {step}); none was applied, so the last checkpoint is clean. "
                f"Lower training.lr or raise training.clip_grad, check the data of these steps, and resume.")


    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])


# -- injected faults (tests only) ------------------------------------------------------------------------------
class StopRequest:
    def __init__(self, announce: bool):
        """`announce`: this rank says why the run stops and writes the requeue marker (`placement.writes`)."""
        self.requested = False
        self.announce = announce

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # (only noted: the step in progress finishes, then its checkpoint is written)

    def agree(self) -> bool:
        """Whether any rank was asked to stop (a collective of every training rank, after each step): a signal
        reaches the ranks at slightly different moments, and one rank entering the checkpoint collective while
        another starts the next step would hang both."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def stop_after(self, step: int) -> None:
        """The run stops after `step` on request: say so, and leave the marker slurm/train.sbatch requeues on."""
        if self.announce:
            print(f"stopping after step {step} on request (signal)", flush=True)
            marker = os.environ.get("SPARK_STOP_MARKER")
            if marker:
                with open(marker, "w") as f:
                    f.write(str(step))


class StepBudget:
    def __init__(self, max_optimizer_steps: Optional[int]):
        self.max_optimizer_steps = max_optimizer_steps

    def spent(self, optimizer_steps: int) -> bool:
        """Whether the budget is reached (the same on every rank: every rank counts the same updates)."""
        return self.max_optimizer_steps is not None and optimizer_steps >= self.max_optimizer_steps


@dataclass(frozen=True)
class FaultPlan:
    """Faults the e2e tests inject because they cannot be caused on demand otherwise: {"hang": [attempt, step,
    rank]} sleeps forever there, {"kill": [attempt, step, rank]} SIGKILLs the rank, {"nonfinite": [step, ...]}
    multiplies those steps' losses by NaN. `attempt` counts the run's starts (torchrun's restarts plus SLURM's
    requeues). The trainer is given one (empty by default: inert); only the entry point reads it, from
    `SPARK_TEST_FAULTS` (`from_env`)."""
    kill: Optional[tuple[int, int, int]] = None
    hang: Optional[tuple[int, int, int]] = None
    nonfinite: tuple[int, ...] = ()
    attempt: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "FaultPlan":
        raw = json.loads(env.get("SPARK_TEST_FAULTS") or "{}")
        attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) + int(env.get("SLURM_RESTART_COUNT", "0"))
        return cls(tuple(raw["kill"]) if "kill" in raw else None, tuple(raw["hang"]) if "hang" in raw else None,
                   tuple(raw.get("nonfinite", ())), attempt)

    def at_step(self, step: int, rank: int) -> None:
        """Called as step `step` (1-based, as logged) starts on `rank`."""
        if self.kill == (self.attempt, step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang == (self.attempt, step, rank):
            _injected_hang()

    def loss_scale(self, step: int) -> Optional[float]:
        """NaN for the steps (1-based) whose losses are poisoned, else None."""
        return float("nan") if step in self.nonfinite else None


def _injected_hang() -> None:  # (named, so that the watchdog's stack dump shows where the rank stopped)
    while True:
        time.sleep(3600)
