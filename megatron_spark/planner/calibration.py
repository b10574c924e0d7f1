"""The measured peaks the planner's overhead term is fitted to, and its error on each (docs/scaling.md).

`bench/mfu.py` on one H200 (docs/benchmarks.md, "On a GPU"): Qwen2.5 text stacks with fewer layers and the full
vocabulary, bf16, megatron-core DDP + distributed optimizer at DP=1, TP=PP=1, micro-batch 1, no recompute, the
local layer spec (unfused attention: the s x s scores are stored), no reference model, no vLLM;
`torch.cuda.max_memory_allocated` after warm-up, a log-prob pass and the timed updates.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_spark.models.hf_config import parse_hf_config
from megatron_spark.planner.memory import ENGINE_ASLEEP_GIB, GIB, Layout, Workload, plan_memory
from megatron_spark.planner.model import BUILTIN


@dataclass(frozen=True)
class Measurement:
    model: str
    layers: int
    seq: int
    micro_batches: int
    peak_gib: float


MEASURED = [Measurement("qwen2.5-7b", 8, 2048, 4, 61.3), Measurement("qwen2.5-7b", 8, 4096, 2, 84.0),
            Measurement("qwen2.5-vl-32b", 2, 2048, 4, 52.3), Measurement("qwen2.5-vl-32b", 2, 2048, 8, 52.3)]


def predicted_gib(m: Measurement) -> float:
    cfg = dict(BUILTIN[m.model])
    text = {k: v for k, v in cfg.items() if k not in ("architectures", "text_config", "vision_config")}
    text.update(num_hidden_layers=m.layers, architectures=["Qwen2ForCausalLM"])
    for k in ("image_token_id", "vision_start_token_id"):
        text.pop(k, None)
    shape = parse_hf_config(text, m.model)
    work = Workload(prompts=m.micro_batches, reward_prompts=0, n_samples=1, prompt_len=m.seq // 4,
                    response_len=m.seq - m.seq // 4, attention="unfused")
    (stage,) = plan_memory(shape, Layout(reference_on_gpu=False), work)
    return (stage.train - ENGINE_ASLEEP_GIB * GIB) / GIB  # no engine in the benchmark


def errors() -> list[tuple[Measurement, float, float]]:
    """(measurement, predicted GiB, relative error) for every measurement."""
    return [(m, p, (p - m.peak_gib) / m.peak_gib) for m in MEASURED for p in [predicted_gib(m)]]
