#!/usr/bin/env python
"""How long a checkpoint blocks training: synchronous save vs `checkpoint.async_save` (megatron-core's async save).

    python bench/checkpoint.py [--model DIR] [--repeats 5] [--updates 20] [--dir /tmp/spark-ckpt-bench]

torchrun, 2 CPU ranks (gloo), Megatron PP=2: the policy of `megatron-spark train` (model, Adam state, LR schedule)
saved by the trainer's CheckpointManager. Each repeat saves once, then makes --updates in-place updates (every
parameter and Adam moment rewritten, as an optimizer step does, the save polled after each one, as the trainer polls
after each step), then waits for the save to complete. Reported per mode, median and range over the repeats:
  blocked_s  the time `save()` holds the training loop (the whole write when synchronous, the staging when async)
  done_s     from the save's start until its checkpoint is complete (renamed and named in the tracker)
and the bytes of one checkpoint with the synchronous write rate (the physical bound of the blocking save is bytes
/ this machine's write bandwidth). The async checkpoints are checked to hold the state at save time, not the
state the training beside the write produced. Model: SmolLM2-135M-Instruct from `make pretrained` when present,
else the tiny Qwen2.5-VL of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_model() -> Path:
    smol = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
    if (smol / "config.json").is_file():
        return smol
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    return build_qwen2_5_vl(Path(tempfile.mkdtemp()) / "tiny")


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from megatron_spark.checkpoint import CheckpointManager, ModelCard
    from megatron_spark.config import CheckpointConfig, load_config
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.policy import Policy

    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml", [f"model.hf_dir={a.model}"])
    shape = load_hf_config(a.model)
    layout = ParallelLayout(tp=1, pp=2, world_size=int(os.environ["WORLD_SIZE"]))  # each rank saves its stage
    layout.initialize(seed=1)
    policy = Policy.build(shape, layout, cfg.model, cfg.training, pad_id=0, total_steps=100)
    for c in policy.chunks:  # one optimizer step on zero gradients: Adam's moments exist, as in a running trainer
        c.zero_grad_buffer()
    policy.optimizer.zero_grad()
    policy.optimizer.step()
    params = [p.data for c in policy.chunks for p in c.parameters()]
    tensors = list(params)
    for o in policy.optimizer.chained_optimizers:
        tensors += [v for s in o.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    rank = dist.get_rank()
    results: dict = {}
    for mode in ("sync", "async"):
        root = Path(a.dir) / mode
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
        mgr = CheckpointManager(CheckpointConfig(dir=str(root), save_interval=1, keep_last=1,
                                                 async_save=mode == "async"), policy, {},
                                ModelCard(shape, layout.tp, str(a.model), cfg.model.dtype), layout,
                                writes=rank == 0)
        rows = []
        for rep in range(a.repeats + 1):  # the first save of each mode starts its helpers: not counted
            step = rep + 1
            marker = float(step)
            with torch.no_grad():
                for t in params:
                    t.fill_(marker)  # what this checkpoint must hold
            dist.barrier()
            t0 = time.perf_counter()
            mgr.save(step)
            blocked = time.perf_counter() - t0
            done = None
            for _ in range(a.updates):  # the same count on every rank: poll is a collective, as after each step
                with torch.no_grad():
                    for t in tensors:
                        t.mul_(1.0000001)  # every page touched, as an optimizer step touches them
                    for t in params:
                        t.fill_(-1.0)
                mgr.poll()
                if done is None and mgr.last_saved == step:
                    done = time.perf_counter() - t0
            mgr.wait()
            if done is None:
                done = time.perf_counter() - t0
            if rep:
                rows.append({"blocked_s": blocked, "done_s": done})
        dist.barrier()
        it = root / f"iter_{step:07d}"
        nbytes = sum(f.stat().st_size for f in it.rglob("*") if f.is_file())
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
        results[mode] = {"rows": rows, "bytes": nbytes, "held_marker": _holds(it, policy, marker)}
        mgr.finish()
    if rank == 0:
        Path(a.result).write_text(json.dumps(results))


def _holds(it: Path, policy, marker: float) -> bool:
    """Every saved parameter holds the value it had at save time (not the -1 written while the save ran)."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    state = policy.sharded_state(loading=True)
    models = {k: v for k, v in state.items() if k.startswith("model")}
    loaded = dist_checkpointing.load(models, str(it))
    ok = all(bool((v == marker).all()) for m in loaded.values() for k, v in m.items()
             if torch.is_tensor(v) and v.is_floating_point() and "_extra_state" not in k)
    flag = [None] * dist.get_world_size()
    dist.all_gather_object(flag, ok)
    return all(flag)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory (default: SmolLM2-135M-Instruct from make pretrained, else tiny)")
    ap.add_argument("--repeats", type=int, default=5, help="saves per mode (after one uncounted warm-up save)")
    ap.add_argument("--updates", type=int, default=20, help="in-place updates of the whole state after each save")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "spark-ckpt-bench"), help="scratch directory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    model = Path(a.model) if a.model else default_model()
    result = Path(a.dir) / "result.json"
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    from megatron_spark.launch import torchrun_command

    cmd = torchrun_command(2, [str(Path(__file__).resolve()), "--worker", "--model", str(model), "--repeats",
                               str(a.repeats), "--updates", str(a.updates), "--dir", a.dir, "--result", str(result)])
    subprocess.run(cmd, check=True, cwd=ROOT)
    r = json.loads(result.read_text())
    print(f"model {model.name}, PP=2 on 2 CPU ranks, {r['sync']['bytes'] / 2**30:.2f} GiB per checkpoint, "
          f"{a.repeats} saves per mode, {a.updates} updates of the whole state after each")
    print("| mode | blocked s (median [range]) | save complete after s | checkpoint holds the save-time state |")
    print("|---|---|---|---|")
    for mode in ("sync", "async"):
        rows = r[mode]["rows"]
        print(f"| {mode} | {summary([x['blocked_s'] for x in rows])} | {summary([x['done_s'] for x in rows])} | "
              f"{'yes' if r[mode]['held_marker'] else 'NO'} |")
    sync = statistics.median(x["blocked_s"] for x in r["sync"]["rows"])
    asyn = statistics.median(x["blocked_s"] for x in r["async"]["rows"])
    print(f"blocked: async / sync = {asyn / sync:.3f}; sync write rate {r['sync']['bytes'] / sync / 2**20:.0f} MiB/s")


if __name__ == "__main__":
    main()
