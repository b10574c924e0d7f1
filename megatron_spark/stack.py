"""The components of one training run, typed: what `train.build_stack` builds from the config and the trainer,
the checkpoint manager and the demo are given. (Built once per process; every rank holds its own.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class RLStack:
    shape: Any                  # models.hf_config.ModelShape
    layout: Any                 # parallel.ParallelLayout (process groups initialised)
    placement: Any              # placement.RolloutPlacement: which rank does what
    prompts: Any                # data.PromptBuilder
    data: Any                   # data.PromptStream
    policy: Any                 # policy.Policy (trainable)
    reference: Any              # policy.Policy (frozen; the KL term)
    engine: Any                 # rollout.engine.RolloutEngine or rollout.hf_engine.HFRolloutEngine
    sync: Any                   # bridge.sync.WeightSync
    rewards: Optional[Any]      # reward.RewardPool on the rank that scores (placement.reward_rank), else None
    templates: Any              # templates.TemplateBank
    logger: Any                 # metrics.MetricsLogger
    total_steps: int            # global steps of the run (training.max_steps, or the episodes' worth)

    def close(self) -> None:
        """End what the stack started that does not end with the process by itself (the reward workers)."""
        if self.rewards is not None:
            self.rewards.close()
