"""`megatron-spark plan`: every layout that the trainer accepts for a model on N GPUs, its memory per stage and
phase and its predicted step time; feasible ones ranked by tokens/s/GPU, infeasible ones with the reason."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_spark.models.hf_config import ModelShape
from megatron_spark.planner.hardware import Gpu
from megatron_spark.planner.memory import GIB, Layout, StageMemory, Workload, infeasible_reason, plan_memory
from megatron_spark.planner.model import param_counts
from megatron_spark.planner.steptime import StepTime, plan_time

RECOMPUTE = ("none", "selective", "full")


@dataclass
class Plan:
    layout: Layout
    memory: list[StageMemory]
    time: StepTime
    reason: Optional[str]

    @property
    def feasible(self) -> bool:
        return self.reason is None

    @property
    def peak(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.peak)

    def tokens_per_gpu_s(self) -> float:
        return self.time.tokens / self.time.total / self.layout.gpus


def layout_problem(shape: ModelShape, layout: Layout, work: Workload) -> Optional[str]:
    """Why the trainer would refuse this layout (the config's own rules), or None."""
    from megatron_spark.parallel import check_model_layout

    r = layout.rollout_tp
    try:
        check_model_layout(shape, layout.tp, layout.pp, r, ("TP", "PP", "rollout TP"))
    except ValueError as e:
        return str(e)
    if layout.gpus % layout.rollout_tp:
        return f"rollout TP={r} does not divide {layout.gpus} GPUs"
    gb = work.global_batch or work.prompts * work.n_samples
    if gb % (work.micro_batch_size * layout.dp):
        return f"global batch {gb} is not divisible by micro-batch x DP = {work.micro_batch_size} x {layout.dp}"
    return None


def evaluate(shape: ModelShape, layout: Layout, work: Workload, hw: Gpu, gpus_per_node: int, mfu: float) -> Plan:
    mem = plan_memory(shape, layout, work, hw.memory_gib * GIB)
    return Plan(layout, mem, plan_time(shape, layout, work, hw, gpus_per_node, mfu, layout.reference_on_gpu,
                                       mem[0].concurrency),
                infeasible_reason(mem, hw.memory_gib * GIB, layout))


def search(shape: ModelShape, gpus: int, gpus_per_node: int, hw: Gpu, work: Workload, mfu: float = 0.30,
           distributed_optimizer: bool = True, reference_on_gpu: bool = True) -> list[Plan]:
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError("--gpus and --gpus-per-node must be >= 1")
    sizes = [k for k in (1, 2, 4, 8, 16) if k <= gpus_per_node and gpus % k == 0]
    plans = []
    for tp, pp, rtp, rc in itertools.product(sizes, (1, 2, 4, 8, 16), sizes, RECOMPUTE):
        if gpus % (tp * pp) or (rc == "selective" and work.attention == "flash"):
            continue  # (selective recompute only drops the s x s attention tensors that flash never stores)
        layout = Layout(tp, pp, gpus // (tp * pp), rtp, rc, distributed_optimizer, False, reference_on_gpu)
        if layout_problem(shape, layout, work) is None:
            plans.append(evaluate(shape, layout, work, hw, gpus_per_node, mfu))
    plans.sort(key=lambda p: (not p.feasible, -p.tokens_per_gpu_s(), p.peak.peak))
    return plans


def count(n: int) -> str:
    """A parameter count as its digits and a rounded form that stays readable at every size: 33,452,718,336
    (33.45 B), 6,846,080 (6.85 M), 4,096 (4.10 K)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def header(shape: ModelShape, name: str) -> str:
    c = param_counts(shape)
    vision = f", vision tower {count(c.vision)}" if c.vision else ""
    return f"{name}: {count(c.total)} parameters (language model {count(c.language)}{vision})"


def _row(i: int, p: Plan) -> str:
    m, t = p.peak, p.time
    g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    return (f"| {i} | {p.layout.describe()} | {g(m.peak)} (stage {m.stage}, {m.peak_phase}) | {g(m.static)} | "
            f"{g(m.activations + m.logits)} | {g(m.vllm_weights)} + {g(m.kv_cache)} ({m.concurrency} seqs) | "
            f"{t.total:.0f} ({t.rollout:.0f} / "
            f"{t.logprobs:.0f} / {t.update:.0f} / {t.sync:.1f}) | {p.tokens_per_gpu_s():.0f} |")


def report(plans: list[Plan], top: int = 8, infeasible_shown: int = 5) -> str:
    feasible = [p for p in plans if p.feasible]
    lines = ["| # | layout | peak GiB | static GiB | activations+logits GiB | vLLM weights + KV GiB | "
             "step s (rollout / log-probs / update / sync) | tokens/s/GPU |", "|---|---|---|---|---|---|---|---|"]
    lines += [_row(i + 1, p) for i, p in enumerate(feasible[:top])]
    if not feasible:
        lines.append("| - | no feasible layout | | | | | | |")
    bad = [p for p in plans if not p.feasible]
    lines.append(f"\n{len(feasible)} feasible of {len(plans)} valid layouts"
                 + ("; the fastest infeasible ones fail because:" if bad else ""))
    bad.sort(key=lambda p: -p.tokens_per_gpu_s())
    lines += [f"- {p.layout.describe()}: {p.reason}" for p in bad[:infeasible_shown]]
    return "\n".join(lines)


def to_json(plans: list[Plan]) -> str:
    return json.dumps([{"layout": asdict(p.layout), "feasible": p.feasible, "reason": p.reason,
                        "peak_gib": p.peak.peak / GIB, "peak_stage": p.peak.stage, "phase": p.peak.peak_phase,
                        "step_s": asdict(p.time), "tokens_per_gpu_s": p.tokens_per_gpu_s(),
                        "stages": [{"stage": m.stage, "train_gib": m.train / GIB, "rollout_gib": m.rollout / GIB,
                                    "static_gib": m.static / GIB, "activations_gib": m.activations / GIB}
                                   for m in p.memory]} for p in plans], indent=1)


def attention_kind(transformer_impl: str, te_available: Optional[bool] = None) -> str:
    """The attention the trainer will run: fused ('flash': TE's kernels, the vision tower as THD windows) unless
    the local spec is asked for, or `auto` finds no working Transformer Engine (`te_available` False), in which
    case attention scores and the vision tower's dense window masks are materialised ('unfused', s^2 memory)."""
    if transformer_impl == "local" or (transformer_impl == "auto" and te_available is False):
        return "unfused"
    return "flash"


def from_config(cfg, te_available: Optional[bool] = None) -> tuple[Layout, Workload]:
    """The layout and workload a SparkConfig asks for (megatron_spark.config). `te_available`: whether
    Transformer Engine imports where the job runs (None: unknown, assume it does, as on a GPU cluster)."""
    par, ro, d, tr, alg = cfg.parallel, cfg.rollout, cfg.data, cfg.training, cfg.algorithm
    rc = cfg.model.recompute_activations
    return (Layout(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, 1, ro.tensor_parallel_size, rc,
                   tr.use_distributed_optimizer, par.sequence_parallel,
                   alg.kl_coef > 0 and not tr.offload_reference, par.num_layers_in_first_pipeline_stage,
                   par.num_layers_in_last_pipeline_stage, tuple(cfg.model.freeze)),
            Workload(d.rollout_batch_size, alg.recycle.reward_batch_size, ro.n_samples_per_prompt, d.prompt_max_len,
                     0, ro.max_new_tokens, tr.micro_batch_size, tr.global_batch_size, ro.max_num_seqs,
                     gpu_memory_utilization=ro.gpu_memory_utilization, dtype=cfg.model.dtype,
                     attention=attention_kind(cfg.model.transformer_impl, te_available),
                     old_logprobs=alg.old_logprobs))
