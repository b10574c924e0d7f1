"""The metrics of a whole step that need every rank (collectives): the weight sync's bytes and the step's times and
memory. (A period's own metrics are `period_metrics`, a pure function.)"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sync_bytes(name: str, stats) -> dict:
    """Bytes the last weight sync (`stats`: bridge.sync's) moved between processes and copied within them, summed
    over the trainer's ranks; with whole HF tensors ('hf_full') every rollout rank receives the whole model once."""
    t = torch.tensor([float(stats.bytes_sent), float(stats.bytes_local)])
    dist.all_reduce(t)
    return {f"{name}/sync_bytes_sent": t[0].item(), f"{name}/sync_bytes_local": t[1].item()}


def step_metrics(episode: int, queue: int, reward_period: bool, step_s: float, optimizer_steps: int) -> dict:
    """The step's own metrics: per-rank step times and, on GPU, the memory peak (the planner's comparison)."""
    per_rank = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, torch.tensor([step_s]))
    times = [t.item() for t in per_rank]
    m = {"episode": episode, "queue": queue, "reward_period": int(reward_period), "time/step": step_s,
         "time/step_rank_min": min(times), "time/step_rank_max": max(times),
         "time/slowest_rank": times.index(max(times)), "optimizer_steps": optimizer_steps}
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        m["memory/max_allocated_gib"] = peak.item()
    return m
