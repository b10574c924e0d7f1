"""Collectives that are right on a GPU by construction: the default group maps CPU tensors to gloo and CUDA tensors
to NCCL, and every megatron-core group inherits that map (a pure "nccl" group fails any CPU tensor: "No backend type
associated with device type cpu", the trainer's metrics and stop flag among them)."""
import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_backend_maps_both_device_types():
    from megatron_spark.parallel import process_group_backend

    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(cuda=False) == "gloo"


@pytest.mark.slow
def test_megatron_core_groups_inherit_the_device_map():
    """One process: the GPU's device map with NCCL swapped for gloo (no NCCL on CPU), then megatron-core's groups:
    each must carry both device types, and a CPU tensor must reduce in the data-parallel group."""
    script = """
import torch, torch.distributed as dist
from megatron_spark import compat, cpu_shim
from megatron_spark.parallel import process_group_backend
cpu_shim.install()
backend = process_group_backend(cuda=True).replace("nccl", "gloo")
dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
compat.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
from megatron.core import parallel_state as ps
groups = [ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
          ps.get_data_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True),
          ps.get_embedding_group(), ps.get_model_parallel_group()]
configs = {str(dist.get_backend_config(g)) for g in groups}
t = torch.ones(1)
dist.all_reduce(t, group=ps.get_data_parallel_group())
print(sorted(configs), float(t))
"""
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "['cpu:gloo,cuda:gloo'] 1.0"


def test_the_bridge_nccl_group_gets_the_configured_timeout(monkeypatch):
    """The disaggregated bridge's NCCL group once kept NCCL's 10-minute default (the configured timeout reached the
    gloo half only): a 32B sync slower than that aborted the trainer. (No NCCL on CPU: a recording stand-in.)"""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megatron_spark.rollout import remote

    made = []

    class FakeNCCL:
        class Options:
            _timeout = None

        def __init__(self, store, rank, world, opts):
            made.append(opts)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    remote.JobGroup(dist.HashStore(), 0, 1, 7200)
    assert len(made) == 1 and made[0]._timeout == timedelta(seconds=7200)


@pytest.mark.slow
def test_a_colocated_engine_put_to_sleep_is_woken_before_it_generates():
    """The trainer puts the colocated engine to sleep for a checkpoint (its gathers need the GPU memory the engine
    holds); the next generation must wake it first, whatever put it to sleep."""
    import torch.distributed as dist

    from megatron_spark.placement import RolloutPlacement
    from megatron_spark.rollout.colocated import ColocatedRollouts
    from megatron_spark.rollout.engine import Sampling
    from megatron_spark.rollout.protocols import GenerationPart

    events = []

    class Engine:  # (as RolloutEngine: the parts asleep, woken by tag)
        sleeping: set = set()

        def sleep(self):
            events.append("sleep")
            self.sleeping = {"weights", "kv_cache"}

        def wake_up(self, tags=None):
            todo = sorted(t for t in (tags or ("weights", "kv_cache")) if t in self.sleeping)
            if todo:
                events.append("wake " + "+".join(todo))
                self.sleeping -= set(todo)

        def generate(self, requests, **kw):
            assert not self.sleeping, "generate() on a sleeping engine"
            events.append("generate")
            return [[] for _ in requests]

    class Sync:
        def push(self, engine):
            assert "weights" not in engine.sleeping, "a sync into sleeping weights"
            events.append("sync")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rollouts = ColocatedRollouts(Engine(), Sync(), RolloutPlacement(1, 1), 0, Sampling(2, 1.0, 1.0, -1, 8))
        part = GenerationPart(2, lambda i: i, lambda e: 0, {})
        rollouts.sleep()   # (a checkpoint)
        rollouts.collect(rollouts.submit([part]))
        rollouts.sleep()   # (a period's update)
        rollouts.push()
        rollouts.collect(rollouts.submit([part]))
    finally:
        dist.destroy_process_group()
    # the sync wakes only the weights: the KV cache is not allocated while the sync's buckets need memory
    assert events == ["sleep", "wake kv_cache+weights", "generate", "sleep", "wake weights", "sync", "wake kv_cache",
                      "generate"]
