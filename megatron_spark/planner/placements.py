"""Colocated vs disaggregated engines vs one-step off-policy, predicted (`megatron-spark plan --placements`).

    colocated              every GPU trains and generates:    step = rollout(G) + train(G) + sync
    disaggregated          T GPUs train, R = G - T generate:   step = rollout(R) + train(T) + sync(T -> R)
    one-step off-policy    the same split, overlapped:         step = max(rollout(R), train(T)) + sync(T -> R)

rollout(R) and train(T) are `steptime.plan_time`'s phases on R and T GPUs (train = the log-prob passes + the
update); an engine on a GPU of its own holds only vLLM, so its KV cache (and the sequences it runs at once) is what
the GPU leaves after the weights at vLLM's usual 90 % share, where a colocated engine shares it with the trainer's
state. The sync of a split sends every rollout GPU the whole model (vLLM's loader takes whole HF tensors), each
training replica feeding its engines from its TP x PP GPUs, over the network when the engines sit on other nodes
(NVLink otherwise); it is exposed in both split modes (the engines wait for the new weights). Throughput is tokens
trained per second per GPU of the whole job (T + R), so a split pays for the GPUs that do not train.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from megatron_spark.models.hf_config import ModelShape
from megatron_spark.planner.hardware import Gpu
from megatron_spark.planner.memory import DTYPE_BYTES, ENGINE_AWAKE_GIB, GIB, OVERHEAD_GIB, Layout, Workload, \
    plan_memory
from megatron_spark.planner.model import kv_bytes_per_token, param_counts
from megatron_spark.planner.search import Plan, layout_problem, search
from megatron_spark.planner.steptime import plan_time

VLLM_SHARE = 0.9  # gpu_memory_utilization of an engine with a GPU of its own


@dataclass(frozen=True)
class PlacementPlan:
    mode: str                 # colocated | disaggregated | one-step off-policy
    train: Layout             # the training layout (its GPUs: train.gpus)
    rollout_gpus: int         # 0: colocated (the engines share the training GPUs)
    rollout_tp: int
    generation: float         # seconds per step
    training: float           # log-prob passes + update
    sync: float
    tokens: int

    @property
    def gpus(self) -> int:
        return self.train.gpus + self.rollout_gpus

    @property
    def step(self) -> float:
        if self.mode == "one-step off-policy":
            return max(self.generation, self.training) + self.sync
        return self.generation + self.training + self.sync

    def tokens_per_gpu_s(self) -> float:
        return self.tokens / self.step / self.gpus

    def describe(self) -> str:
        lay = self.train
        split = f"train {lay.gpus} (TP{lay.tp} PP{lay.pp} DP{lay.dp})"
        if self.rollout_gpus:
            split += f" + engines {self.rollout_gpus} ({self.rollout_gpus // self.rollout_tp} x rTP{self.rollout_tp})"
        else:
            split += f", engines colocated (rTP{self.rollout_tp})"
        return split


def engine_concurrency(shape: ModelShape, rollout_tp: int, work: Workload, hw: Gpu, engines: int) -> int:
    """Sequences one engine on GPUs of its own runs at once: what its KV cache holds, at most max_num_seqs."""
    b = DTYPE_BYTES[work.dtype]
    weights = param_counts(shape).total * b / rollout_tp
    free = hw.memory_gib * GIB * VLLM_SHARE - weights - (ENGINE_AWAKE_GIB + OVERHEAD_GIB) * GIB
    seqs = min(work.max_num_seqs, -(-(work.prompts + work.reward_prompts) * work.n_samples // engines))
    return int(max(0.0, min(seqs, free / (work.seq_len * kv_bytes_per_token(shape, rollout_tp, b)))))


def split_plans(shape: ModelShape, gpus: int, gpus_per_node: int, hw: Gpu, work: Workload, mfu: float = 0.30,
                distributed_optimizer: bool = True, reference_on_gpu: bool = True) -> list[PlacementPlan]:
    """The fastest feasible training layout for every split of `gpus` into training and rollout GPUs (rollout
    GPUs in multiples of the rollout TP), in both split modes."""
    b = DTYPE_BYTES[work.dtype]
    total = param_counts(shape).total
    out = []
    for rollout_gpus in range(1, gpus):
        train_gpus = gpus - rollout_gpus
        best: Optional[Plan] = None
        for plan in search(shape, train_gpus, gpus_per_node, hw, work, mfu, distributed_optimizer,
                           reference_on_gpu):
            lay = plan.layout
            # training GPUs hold no engine: their peak is the training phase's
            train_peak = max(m.train for m in plan_memory(shape, lay, work, hw.memory_gib * GIB))
            if train_peak > hw.memory_gib * GIB or layout_problem(shape, lay, work):
                continue
            time = plan_time(shape, lay, work, hw, gpus_per_node, mfu, lay.reference_on_gpu)
            if best is None or time.logprobs + time.update < best.time.logprobs + best.time.update:
                best = replace(plan, time=time)
        if best is None:
            continue
        for rtp in sorted({best.layout.rollout_tp, 1, 2, 4, 8}):
            if rtp > gpus_per_node or rollout_gpus % rtp:
                continue
            engines = rollout_gpus // rtp
            conc = engine_concurrency(shape, rtp, work, hw, engines)
            if conc < 1:
                continue
            gen = plan_time(shape, Layout(1, 1, rollout_gpus, rtp), work, hw, gpus_per_node, mfu,
                            concurrency=conc).rollout
            bw = hw.network_gb_s if train_gpus >= gpus_per_node else hw.nvlink_gb_s
            # (disaggregated engines load whole HF tensors: each rollout GPU receives the whole model; each training
            # replica sends it to its engines' GPUs, spread over its TP x PP GPUs)
            lay = best.layout
            per_replica = -(-engines // lay.dp) * rtp * total * b / (lay.tp * lay.pp)
            sync = max(total * b, per_replica) / (bw * 1e9)
            t = best.time
            for mode in ("disaggregated", "one-step off-policy"):
                out.append(PlacementPlan(mode, best.layout, rollout_gpus, rtp, gen, t.logprobs + t.update, sync,
                                         t.tokens))
    return out


def compare(shape: ModelShape, gpus: int, gpus_per_node: int, hw: Gpu, work: Workload, mfu: float = 0.30,
            distributed_optimizer: bool = True, reference_on_gpu: bool = True) -> list[PlacementPlan]:
    """The best plan of each mode (colocated, disaggregated, one-step off-policy), fastest first."""
    best: dict[str, PlacementPlan] = {}
    colocated = [p for p in search(shape, gpus, gpus_per_node, hw, work, mfu, distributed_optimizer,
                                   reference_on_gpu) if p.feasible]
    if colocated:
        p = colocated[0]
        best["colocated"] = PlacementPlan("colocated", p.layout, 0, p.layout.rollout_tp, p.time.rollout,
                                          p.time.logprobs + p.time.update, p.time.sync, p.time.tokens)
    for p in split_plans(shape, gpus, gpus_per_node, hw, work, mfu, distributed_optimizer, reference_on_gpu):
        if p.mode not in best or p.tokens_per_gpu_s() > best[p.mode].tokens_per_gpu_s():
            best[p.mode] = p
    return sorted(best.values(), key=lambda p: -p.tokens_per_gpu_s())


def report(plans: list[PlacementPlan]) -> str:
    lines = ["| placement | GPUs | generation s | training s | sync s | step s | tokens/s/GPU |",
             "|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.mode}: {p.describe()} | {p.gpus} | {p.generation:.0f} | {p.training:.0f} | "
                     f"{p.sync:.1f} | {p.step:.0f} | {p.tokens_per_gpu_s():.0f} |")
    return "\n".join(lines)
