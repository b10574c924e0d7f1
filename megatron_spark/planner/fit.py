"""Does a training config fit its GPUs? The planner's verdict for exactly the job's layout, phase by phase.

`megatron-spark train` asks before it starts processes on a GPU (and refuses, or warns with `--force`); a test asks
it of every shipped GPU example. The phases of a colocated step, per GPU of the most loaded pipeline stage:
- train:   the trainer's static state + activations + logits + overhead, the engine asleep;
- rollout: the trainer's static state + overhead + what vLLM takes, `rollout.gpu_memory_utilization` x the GPU
           (its weights, KV cache and activations all come out of that share);
- vLLM's start: vLLM refuses to start unless its whole share is free when it starts (the trainer's state is
  already there), and its share must hold its weights, its working memory and at least one sequence's KV cache.
A layout fits when every phase leaves `margin` of the GPU free (communicators, fragmentation, CUDA graphs).
With disaggregated engines (`rollout.placement: disaggregated`) the trainer's layout spans the training GPUs only
and an engine's GPU holds nothing but vLLM: the rollout phase is vLLM's share alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from megatron_spark.planner.memory import ENGINE_AWAKE_GIB, GIB, MARGIN, OVERHEAD_GIB, plan_memory


@dataclass(frozen=True)
class Fit:
    phases: dict[str, float]        # phase -> bytes needed on the most loaded GPU
    gpu_bytes: float
    problems: tuple[str, ...]       # empty when it fits; each names the phase, the numbers and a fix

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
        return ", ".join(f"{p} {g(v)} GiB" for p, v in self.phases.items()) + f" of {g(self.gpu_bytes)} GiB"


def check_fit(cfg, shape, gpus: int, gpu_bytes: float, margin: float = MARGIN,
              te_available: Optional[bool] = None) -> Fit:
    """The planner's verdict for `cfg`'s layout and workload on `gpus` GPUs of `gpu_bytes` each (`te_available`:
    whether Transformer Engine imports there; without it `transformer_impl: auto` runs unfused attention)."""
    from megatron_spark.planner.search import from_config

    from megatron_spark.config import training_world
    from megatron_spark.planner.memory import DTYPE_BYTES
    from megatron_spark.planner.model import kv_bytes_per_token

    layout, work = from_config(cfg, te_available)
    disaggregated = cfg.rollout.placement == "disaggregated"
    layout = replace(layout, dp=max(1, training_world(cfg, gpus) // (layout.tp * layout.pp)))
    if shape.vision is None:
        work = replace(work, image_tokens=0)
    mem = plan_memory(shape, layout, work, gpu_bytes)
    worst = max(mem, key=lambda m: m.train)
    util = cfg.rollout.gpu_memory_utilization
    # (disaggregated: the engines' GPUs hold no trainer state, but receive the sync's buckets of whole tensors
    # beside vLLM's share: two with double buffering, the GPU default)
    # (a bucket holds at least one whole tensor: the 32B embedding alone is 1.56 GB in bf16)
    largest = shape.text.vocab_size * shape.text.hidden_size * DTYPE_BYTES[work.dtype]
    buckets = (1 if cfg.rollout.sync_double_buffer is False else 2) * max(cfg.rollout.sync_bucket_mb * 2 ** 20,
                                                                          largest)
    static = (buckets if disaggregated else max(m.static for m in mem)) + OVERHEAD_GIB * GIB
    share = util * gpu_bytes
    per_seq = work.seq_len * kv_bytes_per_token(shape, layout.rollout_tp, DTYPE_BYTES[work.dtype])
    need_engine = mem[0].vllm_weights + ENGINE_AWAKE_GIB * GIB + per_seq
    # (colocated: the rollout phase as plan_memory computes it for this share, the number `plan` prints)
    rollout = static + share if disaggregated else max(m.rollout for m in mem)
    phases = {"train": worst.train, "rollout": rollout, "vLLM share": share}
    limit = (1 - margin) * gpu_bytes
    g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    problems = []
    if worst.train > limit:
        fix = "model.recompute_activations=full" if cfg.model.recompute_activations != "full" else \
            "a larger TP or PP"
        if cfg.parallel.tensor_model_parallel_size > 1 and not cfg.parallel.sequence_parallel:
            fix += ", parallel.sequence_parallel=true"
        if work.attention == "unfused":
            fix += (", or fused attention (model.transformer_impl is local, or Transformer Engine does not import "
                    "here: its scores are materialised; docs/gpu.md)")
        problems.append(f"train: stage {worst.stage} needs {g(worst.train)} GiB (static {g(worst.static)}, "
                        f"activations {g(worst.activations)}, logits {g(worst.logits)}) of {g(gpu_bytes)} GiB, more "
                        f"than the {1 - margin:.0%} that leaves room for the rest; use {fix}")
    free_at_start = gpu_bytes - static
    if share > free_at_start:
        problems.append(f"rollout: rollout.gpu_memory_utilization={util} asks vLLM for {g(share)} GiB but only "
                        f"{g(free_at_start)} GiB is free next to the trainer's state ({g(static)} GiB): vLLM will "
                        f"not start; lower it to <= {int(100 * (free_at_start / gpu_bytes - margin)) / 100:.2f} or "
                        f"shard the trainer more")
    elif rollout > limit:
        problems.append(f"rollout: the trainer's state {g(static)} GiB + vLLM's share {g(share)} GiB leave less "
                        f"than {margin:.0%} of {g(gpu_bytes)} GiB free; lower rollout.gpu_memory_utilization to "
                        f"<= {int(100 * (limit - static) / gpu_bytes) / 100:.2f}")
    if share < need_engine:
        problems.append(f"rollout: vLLM's share {g(share)} GiB cannot hold its weights {g(mem[0].vllm_weights)} "
                        f"GiB, its working memory and one {work.seq_len}-token sequence's KV cache "
                        f"({g(need_engine)} GiB); raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size")
    return Fit(phases, gpu_bytes, tuple(problems))


def gpu_memory_bytes() -> Optional[float]:
    """This machine's GPU size (the current device), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
