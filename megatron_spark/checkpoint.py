"""Save and resume everything, atomically, through megatron-core dist-checkpointing.

Layout (Megatron-LM's): CKPT/iter_0000042/ (torch_dist model + optimizer, common.pt with scheduler/step/data
cursor/FIFO, rng/rank_*.pt) and CKPT/latest_checkpointed_iteration.txt. A checkpoint is written into
`iter_X.tmp`, renamed when every rank has finished, and only then named in the tracker file (itself replaced
atomically): a crash never leaves a half checkpoint that looks complete. Resuming reshards the model and
optimizer to the current TP/PP (dist-checkpointing), then re-syncs the rollout engine.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spark.io.checkpoint_layout import (TRACKER, check_iteration, complete_steps, iter_dir, load_strict,
                                                 model_sharded_state, write_manifest)

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, ck_cfg, trainer):
        from megatron_spark import compat
        from megatron_spark.lifetime import Reaper, ignore_job_signals

        self.cfg, self.t = ck_cfg, trainer
        # megatron-core's checkpoint writer needs a Manager process that would die of SLURM's SIGUSR1 / SIGTERM (so
        # the checkpoint those signals ask for would fail) and that nothing ends if the trainer is killed: start it
        # here, shielded from the job's signals, and have the reaper end it when this process dies
        self.reaper = Reaper()
        writer_pid = compat.checkpoint_writer_queue(initializer=ignore_job_signals)
        if writer_pid is not None:
            self.reaper.watch(writer_pid)
        self.root = Path(ck_cfg.dir)
        self.rank = dist.get_rank()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self.last_saved: Optional[int] = None
        self.current: Optional[int] = None

    # -- state --------------------------------------------------------------------------------------------------
    def _sharded_state(self, loading: bool = False) -> dict:
        model_sd = model_sharded_state(self.t.policy.modules)
        opt = self.t.policy.optimizer
        if loading and hasattr(opt, "chained_optimizers"):
            # torch's Adam has no state before its first step; give it shapes to load into (docs/cpu.md)
            for o in opt.chained_optimizers:
                if hasattr(o, "_init_optimizer_states_with_dummy_values"):
                    o._init_optimizer_states_with_dummy_values()
        state = dict(model_sd)
        state["optimizer"] = opt.sharded_state_dict(model_sd, is_loading=loading)
        return state

    def _common(self, step: int) -> dict:
        t = self.t
        return {"step": step, "optimizer_steps": t.policy.optimizer_steps,
                "scheduler": t.policy.scheduler.state_dict(), "cursor": vars(t.data.cursor).copy(),
                "queue": t.queue.state_dict(), "trainer_rng": t.rng.getstate(),
                "parallel": {"tp": t.layout.tp, "pp": t.layout.pp, "world": t.layout.world_size}}

    # -- save ---------------------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        from megatron.core import dist_checkpointing

        final = iter_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = self._sharded_state()
        state["common"] = self._common(step)
        # into an empty directory (megatron-core warns "Overwriting old incomplete / corrupted checkpoint" at
        # anything else); the per-rank RNG files go in after it
        dist_checkpointing.save(state, str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda_tracker": _tracker_states()}, tmp / "rng" / f"rank_{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            write_manifest(tmp)
            self._describe_model()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / TRACKER, str(step))
            self._prune()
        dist.barrier()
        self.last_saved = step
        return final

    def _describe_model(self) -> None:
        """megatron_spark.json + hf_assets/ at the root, so tools/convert/megatron_to_hf.py can export any iteration
        without the original HF directory."""
        import json

        from megatron_spark.convert.layout import META_FILE, write_model_metadata

        if (self.root / META_FILE).is_file():
            return
        from megatron_spark.mapping.qwen import WeightMap

        t, hf_dir = self.t, Path(self.t.cfg.model.hf_dir)
        write_model_metadata(self.root, json.loads((hf_dir / "config.json").read_text()), t.shape,
                             WeightMap(t.shape, tp=t.layout.tp).padded_vocab, t.cfg.model.dtype, str(hf_dir), hf_dir)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[:-self.cfg.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def on_step(self, step: int, metrics: dict) -> None:
        self.current = step
        if step % self.cfg.save_interval == 0 or self.t.stop_requested:
            self.save(step)

    def finish(self) -> None:
        """A final checkpoint at the last completed step, unless the interval already wrote it."""
        if self.current is not None and self.current != self.last_saved:
            self.save(self.current)
        self.reaper.close()  # a normal end: the helpers shut down on their own

    def _usable_step(self) -> Optional[int]:
        return usable_step(self.root, self.rank)

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
        state = self._sharded_state(loading=True)
        state["common"] = self._common(0)
        loaded = dist_checkpointing.load(state, str(path))
        modules = self.t.policy.modules
        for i, m in enumerate(modules):
            load_strict(m, loaded["model" if len(modules) == 1 else f"model{i}"], path)
        with torch.no_grad():
            self.t.policy.optimizer.load_state_dict(loaded["optimizer"])
        c = loaded["common"]
        t = self.t
        t.policy.optimizer_steps = c["optimizer_steps"]
        t.policy.scheduler.load_state_dict(c["scheduler"])
        from megatron_spark.data import Cursor

        t.data.cursor = Cursor(**c["cursor"])
        t.queue.load_state_dict(c["queue"])
        t.rng.setstate(_as_rng_state(c["trainer_rng"]))
        rng_file = path / "rng" / f"rank_{self.rank}.pt"
        if rng_file.is_file() and c["parallel"]["world"] == t.layout.world_size:
            r = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(r["torch"])
            random.setstate(r["python"])
            _set_tracker_states(r["cuda_tracker"])
        # The rollout engine still holds the initial weights: bring it to the resumed policy.
        t.sync.push(t.engine)
        self.last_saved = step
        if self.rank == 0:
            print(f"resumed from {path} (step {step})", flush=True)
        return step


def usable_step(root: Path, rank: int) -> Optional[int]:
    """The newest iteration of `root` that checks out (`check_iteration`), naming each damaged one on the way
    (rank 0); None for an empty directory; an error naming the directory and the fix when none is usable."""
    steps = complete_steps(root)
    damaged = []
    for step in steps:
        why = check_iteration(iter_dir(root, step))
        if why is None:
            return step
        damaged.append(f"iter_{step:07d} ({why})")
        if rank == 0:
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
