"""The rules a model puts on a parallel layout, written once (config validation, the converters, verify-sync, the
planner and `ParallelLayout` all apply them). A leaf: it imports nothing of this package, so the config and the
layout can both use it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know of the model (read from its config.json: `ModelFacts.of(shape)`); not part
    of the user's config."""
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    vision_num_heads: Optional[int] = None

    @classmethod
    def of(cls, shape) -> "ModelFacts":
        t, v = shape.text, shape.vision
        return cls(t.num_layers, t.num_heads, t.num_kv_heads, v.num_heads if v else None)


LAYOUT_FIELDS = {"tp": "parallel.tensor_model_parallel_size", "pp": "parallel.pipeline_model_parallel_size",
                 "rollout_tp": "rollout.tensor_parallel_size"}


def model_layout_problems(facts: ModelFacts, tp: int, pp: int, rollout_tp: Optional[int] = None,
                          labels: Optional[dict[str, str]] = None) -> list[tuple[str, str]]:
    """The rules a model puts on a layout, written once: config validation, the converters, verify-sync and the
    planner all apply these. Returns [(knob, message)], knob in LAYOUT_FIELDS, each message naming the knob by its
    `labels` (default TP / PP / rollout TP; a CLI passes its flags) and the fix."""
    lab = {"tp": "TP", "pp": "PP", "rollout_tp": "rollout TP", **(labels or {})}
    out = []
    kv, heads, vision = facts.num_key_value_heads, facts.num_attention_heads, facts.vision_num_heads
    if kv is not None and kv % tp:
        out.append(("tp", f"{lab['tp']} {tp}: the model has {kv} KV heads; TP must divide them"))
    if heads is not None and heads % tp:
        out.append(("tp", f"{lab['tp']} {tp} does not divide the {heads} attention heads; choose a divisor"))
    if vision is not None and vision % tp:
        out.append(("tp", f"{lab['tp']} {tp} does not divide the vision tower's {vision} heads (it is "
                          f"tensor-parallel over the same group); choose a divisor"))
    if facts.num_layers is not None and pp > facts.num_layers:
        out.append(("pp", f"{lab['pp']} {pp} exceeds the model's {facts.num_layers} layers"))
    if rollout_tp is not None and kv is not None and \
            ((rollout_tp > kv and rollout_tp % kv) or (rollout_tp <= kv and kv % rollout_tp)):
        out.append(("rollout_tp", f"{lab['rollout_tp']} {rollout_tp}: vLLM needs a TP that divides the model's "
                                  f"{kv} KV heads or is a multiple of them"))
    return out


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None) -> list[int]:
    """Transformer layers per pipeline stage. Even when PP divides the layer count and no stage is pinned;
    otherwise the middle stages take equal shares and the first and last stages the rest, the first (which also
    holds the embedding and the vision tower) never more than the last. Raises naming the config field to fix."""
    if pp == 1:
        return [num_layers]
    if num_layers < pp:
        raise ValueError(f"parallel.pipeline_model_parallel_size: PP={pp} exceeds the model's {num_layers} layers; "
                         f"use PP <= {num_layers}")
    if first is None and last is None:
        if num_layers % pp == 0:
            return [num_layers // pp] * pp
        m = -(-num_layers // pp)
        while num_layers - (pp - 2) * m < 2:
            m -= 1
        rest = num_layers - (pp - 2) * m
        return [rest // 2] + [m] * (pp - 2) + [rest - rest // 2]
    for name, v in (("num_layers_in_first_pipeline_stage", first), ("num_layers_in_last_pipeline_stage", last)):
        if v is not None and v < 1:
            raise ValueError(f"parallel.{name}: must be >= 1, got {v}")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if (middle == 0 and rest != 0) or (middle > 0 and (rest < middle or rest % middle)):
        raise ValueError(f"parallel.num_layers_in_first_pipeline_stage: first={first}, last={last} leave {rest} of "
                         f"the {num_layers} layers for {middle} other stage(s), which must split them evenly (at "
                         f"least one each); unset both for {stage_layers(num_layers, pp)}")
    share = rest // middle if middle else 0
    return [first if first is not None else share] + [share] * (pp - 2) + [last if last is not None else share]
