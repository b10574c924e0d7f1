"""The losses the policy trains with, as objects that own their normalisation, and the micro-batch they read.

`GRPOLoss` is SPARK's RL loss (PPO-clip + k3 KL to the reference, optional entropy bonus and truncated importance
sampling against the engine's log-probs). Its normalisation (`algorithm.loss_normalization`) decides two things
together, so they can never disagree: what one micro-batch's loss is divided by, and how `Policy.train_step`
combines micro-batches and data-parallel ranks (`share_of_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

from megatron_spark.algorithm import (BatchSize, grpo_loss, masked_mean, sampled_entropy_surrogate,
                                      truncated_is_weights)


@dataclass
class MicroBatch:
    """One micro-batch as the loss reads it: [b, s] tensors aligned with the model's logits (response token j of a
    row sits at position P+j and is predicted at P+j-1)."""
    mask: Tensor                     # 1 on the response tokens of real rows
    old: Tensor                      # pi_old log-probs (Megatron)
    ref: Tensor                      # reference log-probs (Megatron; 0 without KL)
    adv: Tensor                      # [b] advantages
    rollout: Tensor                  # the engine's log-probs of the sampled tokens (0 where none: ratio 1)
    batch: Any = None                # models.runtime.Batch: what the model computes on
    current: Optional[Tensor] = None  # [b, 1] rows whose pi_old is the policy being trained (None: no row)
    known: Optional[Tensor] = None    # [b, 1] rows with the engine's log-probs, for the drift check (None: all)
    n_real: int = 0                  # rows from n_real on are pipeline fillers (mask 0)

    def __post_init__(self):
        rows = torch.zeros(self.mask.shape[0], 1, dtype=torch.bool)
        self.current = rows if self.current is None else self.current
        self.known = ~rows if self.known is None else self.known

    def to(self, device, non_blocking: bool = True) -> "MicroBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if hasattr(getattr(self, f.name), "to")})


class GRPOLoss:
    """The RL loss of one micro-batch. `algorithm.loss_normalization`:
    - "micro_batch": each micro-batch's own mean; megatron-core averages micro-batches and DP ranks;
    - "global_batch": each micro-batch's share of the global batch's loss (its sums divided by the batch's token
      and sequence counts, `for_batch`), so the shares of all micro-batches on all ranks add up to the batch loss
      whatever the layout.
    `scale` multiplies the loss (tests: NaN injects a non-finite update)."""

    def __init__(self, alg, batch: Optional[BatchSize] = None, scale: Optional[float] = None):
        self.alg, self.batch, self.scale = alg, batch, scale

    @property
    def share_of_batch(self) -> bool:
        return self.batch is not None

    def for_batch(self, size: BatchSize) -> "GRPOLoss":
        """The loss of one global batch of `size` (one optimizer step)."""
        if getattr(self.alg, "loss_normalization", "micro_batch") != "global_batch":
            return self
        return GRPOLoss(self.alg, size, self.scale)

    def scaled(self, scale: Optional[float]) -> "GRPOLoss":
        return self if scale is None else GRPOLoss(self.alg, self.batch, scale)

    def __call__(self, logp: Tensor, mb: MicroBatch) -> tuple[Tensor, dict]:
        alg, batch = self.alg, self.batch
        weights, extra = None, {}
        old = torch.where(mb.current, logp.detach(), mb.old)
        # the train/rollout drift of the rows without an old-log-prob pass: their sync check (0 when none here;
        # every micro-batch reports it, so every DP rank reduces the same keys)
        gap = (logp.detach() - mb.rollout).abs() * (mb.mask * (mb.current & mb.known))
        extra["train_rollout_logprob_drift_max"] = gap.max() if gap.numel() else logp.new_zeros(())
        if alg.rollout_is == "tis":  # (a row without the engine's log-probs gets weight 1)
            weights, ratio = truncated_is_weights(old, torch.where(mb.known, mb.rollout, old), alg.rollout_is_cap)
            extra.update(is_ratio_mean=masked_mean(ratio, mb.mask, "token_mean", batch),
                         is_ratio_max=(ratio * mb.mask).max() if ratio.numel() else logp.new_zeros(()),
                         is_capped_fraction=masked_mean((ratio > alg.rollout_is_cap).to(logp.dtype), mb.mask,
                                                        "token_mean", batch))
        out = grpo_loss(logp, old, mb.ref if alg.kl_coef > 0 else None, mb.adv, mb.mask,
                        eps_low=alg.eps_clip_low, eps_high=alg.eps_clip_high, kl_coef=alg.kl_coef,
                        entropy=sampled_entropy_surrogate(logp) if alg.entropy_coef else None,
                        entropy_coef=alg.entropy_coef, reduction=alg.loss_reduction, batch=batch,
                        is_weights=weights)
        loss = out.loss if self.scale is None else out.loss * self.scale
        # entropy: the Monte-Carlo estimate E[-log pi(y)] over the sampled response tokens
        return loss, {"policy_loss": out.policy_loss, "kl": out.kl, "clip_fraction": out.clip_fraction,
                      "entropy": masked_mean(-logp.detach(), mb.mask, "token_mean", batch), **extra}


class SFTLoss:
    """Supervised warm start: mean negative log-likelihood of the response tokens of a micro-batch."""
    share_of_batch = False

    def __call__(self, logp: Tensor, mb: MicroBatch) -> tuple[Tensor, dict]:
        loss = -masked_mean(logp, mb.mask)
        return loss, {"sft_loss": loss.detach()}
