"""Save and resume everything, atomically, through megatron-core dist-checkpointing.

Layout (Megatron-LM's): CKPT/iter_0000042/ (torch_dist model + optimizer, common.pt with scheduler/step/data
cursor/FIFO, rng/rank_*.pt) and CKPT/latest_checkpointed_iteration.txt. A checkpoint is written into
`iter_X.tmp`, renamed when every rank has finished, and only then named in the tracker file (itself replaced
atomically): a crash never leaves a half checkpoint that looks complete, and a manifest of every file's size,
written last, shows later damage. With `checkpoint.async_save` the files are written by a forked process while
training goes on, and the rename happens when every rank's write is done. Resuming reshards the model and optimizer
to the current TP/PP (dist-checkpointing); the caller then re-syncs the rollout engine.

What is saved is declared, not read off a trainer: the policy's sharded model and optimizer plus its own
`state_dict()`, and a map of named `Stateful` parts (data cursor, recycling queue, trainer RNG), each saved under
its name in common.pt and given back through `load_state_dict()`.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_spark.io.checkpoint_layout import TRACKER, check_iteration, complete_steps, iter_dir, write_manifest


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RandomState:
    """A `random.Random` as a Stateful part (its state round-trips through lists when stored)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def state_dict(self):
        return self.rng.getstate()

    def load_state_dict(self, state) -> None:
        self.rng.setstate(_as_rng_state(state))


@dataclass(frozen=True)
class ModelCard:
    """What makes a checkpoint self-describing (megatron_spark.json + hf_assets/): the model's shape and HF
    directory, the trainer's TP (the vocabulary padding) and dtype."""
    shape: Any
    tp: int
    hf_dir: str
    dtype: str
    prompts: Any = None   # the run's prompt protocol (evaluation/protocol.TrainedPrompts), written beside the model


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, ck_cfg, policy, parts: dict[str, Stateful], card: ModelCard, layout, writes: bool):
        """`writes`: this rank writes the run-wide files (directories, manifest, tracker; `placement.writes`)."""
        from megatron_spark import compat
        from megatron_spark.lifetime import Reaper, ignore_job_signals

        self.cfg, self.policy, self.parts, self.card, self.layout = ck_cfg, policy, parts, card, layout
        # megatron-core's checkpoint writer needs a Manager process that would die of SLURM's SIGUSR1 / SIGTERM (so
        # the checkpoint those signals ask for would fail) and that nothing ends if the trainer is killed: start it
        # here, shielded from the job's signals, and have the reaper end it when this process dies
        self.reaper = Reaper()
        writer_pid = compat.checkpoint_writer_queue(initializer=ignore_job_signals)
        if writer_pid is not None:
            self.reaper.watch(writer_pid)
        self.root = Path(ck_cfg.dir)
        self.rank, self.writes = dist.get_rank(), writes
        if self.writes:
            self.root.mkdir(parents=True, exist_ok=True)
            if card.prompts is not None:  # how this run builds prompts: `megatron-spark eval` reads it (and exports)
                card.prompts.write(self.root)
        self.last_saved: Optional[int] = None
        self.current: Optional[int] = None
        self.async_queue = compat.async_calls_queue() if ck_cfg.async_save else None

    @classmethod
    def for_trainer(cls, cfg, trainer, prompts=None) -> "CheckpointManager":
        """The manager of a SparkTrainer's run: its policy and the parts it declares (`state_parts`); `prompts`:
        the run's prompt protocol (`train.prompt_protocol`), written beside the checkpoints."""
        stack = trainer.stack
        card = ModelCard(stack.shape, stack.layout.tp, cfg.model.hf_dir, cfg.model.dtype, prompts)
        return cls(cfg.checkpoint, trainer.policy, trainer.state_parts(), card, stack.layout,
                   writes=stack.placement.writes(trainer.rank))

    # -- state --------------------------------------------------------------------------------------------------
    def _common(self, step: int) -> dict:
        lay = self.layout
        return {"step": step, **self.policy.state_dict(), **{k: p.state_dict() for k, p in self.parts.items()},
                "parallel": {"tp": lay.tp, "pp": lay.pp, "world": lay.world_size}}

    # -- save ---------------------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """The step-`step` checkpoint. Synchronous, or with `checkpoint.async_save` staged here and written in the
        background: it is renamed into place and named in the tracker only once every rank's write has finished
        (`poll` after each step, `wait`), and at most one save is in flight."""
        from megatron.core import dist_checkpointing

        from megatron_spark import compat

        self.wait()  # the previous save is complete (and named) before the next one starts
        final = iter_dir(self.root, step)
        if not self.policy.weights_finite():  # (updates with non-finite gradients are skipped: this is a bug guard)
            raise RuntimeError(f"not writing the step-{step} checkpoint: the weights hold non-finite values; the "
                               f"previous checkpoint in {self.root} is the last clean one")
        tmp = final.with_name(final.name + ".tmp")
        if self.writes:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = self.policy.sharded_state()
        state["common"] = self._common(step)
        # taken now: the state a resume continues from, whenever the files are finished
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda_tracker": _tracker_states()}
        # into an empty directory (megatron-core warns "Overwriting old incomplete / corrupted checkpoint" at
        # anything else); the per-rank RNG files go in after it
        if self.async_queue is not None:
            request = compat.save_async(state, str(tmp))
            request.add_finalize_fn(lambda: self._complete(step, tmp, final, rng))
            # at once, nothing in between: the writer's fork is the snapshot of the tensors it writes
            self.async_queue.schedule_async_request(request)
            for pid in compat.async_writer_pids(self.async_queue):
                self.reaper.watch(pid)
        else:
            dist_checkpointing.save(state, str(tmp))
            self._complete(step, tmp, final, rng)
        return final

    def _complete(self, step: int, tmp: Path, final: Path, rng: dict) -> None:
        """Every rank's files are written: RNG files, then (the writing rank) manifest, rename and tracker."""
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng, tmp / "rng" / f"rank_{self.rank}.pt")
        dist.barrier()
        if self.writes:
            write_manifest(tmp)
            self._describe_model()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / TRACKER, str(step))
            self._prune()
        dist.barrier()
        self.last_saved = step

    def poll(self) -> None:
        """Complete a background save that has finished on every rank (a collective: all ranks, same place)."""
        if self.async_queue is not None and self.async_queue.get_num_unfinalized_calls():
            self.async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and named."""
        if self.async_queue is not None and self.async_queue.get_num_unfinalized_calls():
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _describe_model(self) -> None:
        """megatron_spark.json + hf_assets/ at the root, so `megatron-spark convert megatron-to-hf` can export any
        iteration without the original HF directory."""
        import json

        from megatron_spark.convert.layout import META_FILE, write_model_metadata

        if (self.root / META_FILE).is_file():
            return
        from megatron_spark.mapping.table import WeightMap

        c, hf_dir = self.card, Path(self.card.hf_dir)
        write_model_metadata(self.root, json.loads((hf_dir / "config.json").read_text()), c.shape,
                             WeightMap(c.shape, tp=c.tp).padded_vocab, c.dtype, str(hf_dir), hf_dir)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[:-self.cfg.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def due(self, step: int, stopping: bool = False) -> bool:
        """Does `on_step` write anything after `step` (a checkpoint, or an HF export)?"""
        return step % self.cfg.save_interval == 0 or stopping or bool(
            self.cfg.hf_interval and step % self.cfg.hf_interval == 0)

    def on_step(self, step: int, metrics: dict, stopping: bool = False) -> None:
        """After every step: save at the interval, and before a requested stop (SLURM's signals); the HF export
        at its own interval (not on a stop: the job is asked to end quickly)."""
        self.current = step
        self.poll()
        if step % self.cfg.save_interval == 0 or stopping:
            self.save(step)
        if stopping:
            self.wait()  # the job ends next: its checkpoint must be complete
        if self.cfg.hf_interval and step % self.cfg.hf_interval == 0 and not stopping:
            if self.policy.weights_finite():  # (the same answer on every rank) never publish non-finite weights
                self.export_hf(step)
            elif self.writes:
                print(f"not exporting the HF weights of step {step}: they hold non-finite values", flush=True)

    def export_hf(self, step: int) -> Path:
        """CKPT/hf/step_N from the live weights (megatron_spark/convert/hf_export.py)."""
        from megatron_spark.convert.hf_export import export_hf
        from megatron_spark.mapping.table import WeightMap

        c = self.card
        path = export_hf(step, self.policy.modules, WeightMap(c.shape, tp=c.tp), self.layout, c.hf_dir, self.root,
                         self.cfg.hf_keep_last)
        if self.writes:
            print(f"HF weights of step {step}: {path}", flush=True)
        return path

    def finish(self) -> None:
        """A final checkpoint at the last completed step, unless the interval already wrote it."""
        self.wait()
        if self.current is not None and self.current != self.last_saved:
            self.save(self.current)
            self.wait()
        if self.async_queue is not None:
            self.async_queue.close()
        self.reaper.close()  # a normal end: the helpers shut down on their own

    def _usable_step(self) -> Optional[int]:
        return usable_step(self.root, say=self.writes)

    # -- resume -------------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the latest complete checkpoint if there is one (and resume is on); returns the step to start at."""
        from megatron.core import dist_checkpointing

        if not self.cfg.resume:
            return 0
        step = self._usable_step()
        if step is None:
            return 0
        path = iter_dir(self.root, step)
        state = self.policy.sharded_state(loading=True)
        state["common"] = self._common(0)
        loaded = dist_checkpointing.load(state, str(path))
        self.policy.load_sharded(loaded, path)
        c = loaded["common"]
        self.policy.load_state_dict(c)
        for name, part in self.parts.items():
            if name not in c and getattr(part, "optional", False):  # (a part newer than the checkpoint)
                part.load_state_dict(None)
                continue
            part.load_state_dict(c[name])
        rng_file = path / "rng" / f"rank_{self.rank}.pt"
        if rng_file.is_file() and c["parallel"]["world"] == self.layout.world_size:
            # plain tensors, tuples and numbers: loadable without unpickling code (a shared checkpoint must not run
            # anything when a run resumes from it)
            r = torch.load(rng_file, weights_only=True, map_location="cpu")
            torch.set_rng_state(r["torch"])
            random.setstate(r["python"])
            _set_tracker_states(r["cuda_tracker"])
        self.last_saved = step
        if self.writes:
            print(f"resumed from {path} (step {step})", flush=True)
        return step


def usable_step(root: Path, say: bool) -> Optional[int]:
    """The newest iteration of `root` that checks out (`check_iteration`), naming each damaged one on the way
    (`say`: the rank that writes); None for an empty directory; an error naming the directory and the fix when
    none is usable."""
    steps = complete_steps(root)
    damaged = []
    for step in steps:
        why = check_iteration(iter_dir(root, step))
        if why is None:
            return step
        damaged.append(f"iter_{step:07d} ({why})")
        if say:
            print(f"checkpoint {iter_dir(root, step)} is damaged: {why}; trying the previous one", flush=True)
    if not steps:
        return None
    raise ValueError(f"config field 'checkpoint.dir': no usable checkpoint in '{root}' ({'; '.join(damaged)}); "
                     f"move the directory away to start from the model, or restore a copy of a checkpoint")


def _as_rng_state(s):
    """random.Random state round-trips through lists when stored; turn it back into tuples."""
    return (s[0], tuple(s[1]), s[2]) if isinstance(s, (list, tuple)) else s


def _tracker_states():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def _set_tracker_states(states) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(states)
