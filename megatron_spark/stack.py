"""The components of one training run, typed: what `train.build_stack` builds from the config and the trainer,
the checkpoint manager and the demo are given. (Built once per process; every rank holds its own.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # (annotations only: building a stack imports megatron-core and vLLM lazily, in build_stack)
    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.data import PromptBuilder, PromptStream
    from megatron_spark.evaluation.periodic import HeldOutEval
    from megatron_spark.metrics import MetricsLogger
    from megatron_spark.models.hf_config import ModelShape
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.placement import RolloutPlacement
    from megatron_spark.policy import Policy
    from megatron_spark.reward import RewardPool
    from megatron_spark.rollout.colocated import ColocatedRollouts
    from megatron_spark.rollout.engine import RolloutEngine
    from megatron_spark.rollout.remote import RemoteRollouts
    from megatron_spark.rollout.hf_engine import HFRolloutEngine
    from megatron_spark.templates import TemplateBank


@dataclass
class RLStack:
    shape: ModelShape
    layout: ParallelLayout                          # process groups initialised
    placement: RolloutPlacement                     # which rank does what
    prompts: PromptBuilder
    data: PromptStream
    policy: Policy                                  # trainable
    reference: Policy                               # frozen; the KL term
    engine: Optional[Union[RolloutEngine, HFRolloutEngine]]  # colocated: this rank's engine; disaggregated: None
    sync: WeightSync
    rollouts: Union[ColocatedRollouts, RemoteRollouts]  # generation and weight sync, as the placement says
    rewards: Optional[RewardPool]                   # on the rank that scores (placement.reward_rank), else None
    templates: TemplateBank
    evaluation: Optional[HeldOutEval]               # the held-out evaluation (eval.interval), else None
    logger: MetricsLogger
    total_steps: int                                # global steps of the run (training.max_steps, or the episodes')

    def close(self, stop_engines: bool = True) -> None:
        """End what the stack started that does not end with the process by itself (the reward workers; with
        `stop_engines`, disaggregated engines are told to stop)."""
        if stop_engines:
            self.rollouts.close()
        if self.rewards is not None:
            self.rewards.close()
