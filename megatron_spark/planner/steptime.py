"""Predicted time of one SPARK step (infer + reward period) on a layout, by phase.

    rollout   per engine: prefill 2N FLOPs per prompt token at `prefill_mfu`; decode bandwidth-bound, each step
              reads the engine's weights and the live KV cache once: (W/rTP + seqs x context x KV/token) / (HBM x eta)
    log-probs the reference pass (with KL) and the old pass for the samples that need one (none for a period's
              first optimizer step, none with algorithm.old_logprobs=engine), 2N FLOPs per token each, at `mfu`
    update    6N per token (+2N with full recompute) + attention 6 x layers x q x s per token, at `mfu`, times the
              pipeline bubble 1 + (PP - 1) / micro-batches
    sync      every GPU receives its rollout-TP share of the bf16 weights over NVLink (or the network when a
              training replica spans nodes)
N is the language model's parameter count (the vision tower's FLOPs are small next to it at these image sizes).
`mfu` defaults to 0.30: what bench/mfu.py measured for the update on an H200 without Transformer Engine (24.7-34 %,
docs/benchmarks.md); with TE and flash attention expect more, so the default is pessimistic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_spark.models.hf_config import ModelShape
from megatron_spark.planner.hardware import Gpu
from megatron_spark.planner.memory import DTYPE_BYTES, Layout, Workload
from megatron_spark.planner.model import kv_bytes_per_token, param_counts

DECODE_EFFICIENCY = 0.75
PREFILL_MFU = 0.5


@dataclass(frozen=True)
class StepTime:
    rollout: float
    logprobs: float
    update: float
    sync: float
    tokens: int            # sequence tokens trained per step

    @property
    def total(self) -> float:
        return self.rollout + self.logprobs + self.update + self.sync


def plan_time(shape: ModelShape, layout: Layout, work: Workload, hw: Gpu, gpus_per_node: int, mfu: float = 0.30,
              kl: bool = True, concurrency: Optional[int] = None) -> StepTime:
    """`concurrency`: sequences an engine runs at once (what its KV cache holds; default max_num_seqs)."""
    counts = param_counts(shape)
    n_lm, total = counts.language, counts.total
    t = shape.text
    peak = hw.bf16_tflops * 1e12
    samples = (work.prompts + work.reward_prompts) * work.n_samples
    engines = max(1, layout.gpus // layout.rollout_tp)
    per_engine = -(-samples // engines)
    concurrent = max(1, min(work.max_num_seqs if concurrency is None else concurrency, per_engine))
    waves = -(-per_engine // concurrent)
    prompt = work.prompt_len + work.image_tokens
    b = DTYPE_BYTES[work.dtype]
    step_bytes = total * b / layout.rollout_tp + concurrent * (prompt + work.response_len / 2) * \
        kv_bytes_per_token(shape, layout.rollout_tp, b)
    decode = waves * work.response_len * step_bytes / (hw.hbm_tb_s * 1e12 * DECODE_EFFICIENCY)
    prefill = 2 * n_lm * prompt * per_engine / (layout.rollout_tp * peak * PREFILL_MFU)
    tokens = samples * work.seq_len
    cluster = layout.gpus * peak * mfu
    logprobs = ((1 if kl else 0) + work.old_pass_share()) * 2 * n_lm * tokens / cluster
    attn = 6 * t.num_layers * t.num_heads * t.head_dim * work.seq_len * tokens
    update = ((6 + (2 if layout.recompute == "full" else 0)) * n_lm * tokens + attn) / cluster
    update *= 1 + (layout.pp - 1) / work.micro_batches(layout.dp)
    bw = hw.nvlink_gb_s if layout.tp * layout.pp <= gpus_per_node else hw.network_gb_s
    sync = total * b / layout.rollout_tp / (bw * 1e9)
    return StepTime(decode + prefill, logprobs, update, sync, tokens)
