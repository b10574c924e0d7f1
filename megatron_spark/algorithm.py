"""GRPO pieces as pure tensor functions: group advantages, PPO-clip policy loss, k3 KL, entropy.

Shapes: per-sample tensors are [N]; per-token tensors are [N, T] with a `mask` [N, T] (1 = response token).

Reductions and layout: with `batch=BatchSize(...)` every mean divides by the counts of the whole global batch, so a
micro-batch's loss is its share of the batch's loss and the shares add up to the same number however the batch is
cut into micro-batches and data-parallel ranks. Without it (`micro_batch` normalisation, as SPARK/OpenRLHF do) each
micro-batch is averaged on its own and the micro-batch means are averaged, which weighs a token by the size of the
micro-batch it happened to land in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Literal, Sequence

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, prompt_ids: Sequence[Hashable], std: Literal["unbiased", "population"] =
                     "unbiased", eps: float = 1e-9) -> Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) over the samples that share a prompt id (any order, any sizes).

    `unbiased` uses the n-1 estimator as SPARK/OpenRLHF do; a group whose rewards are all equal gets A = 0.
    A group of one sample has no spread to normalise by and gets A = 0.
    """
    if rewards.dim() != 1 or rewards.numel() != len(prompt_ids):
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} must be [N] with N = "
                         f"{len(prompt_ids)} prompt ids")
    index: dict[Hashable, int] = {}
    groups = torch.tensor([index.setdefault(p, len(index)) for p in prompt_ids], device=rewards.device)
    r = rewards.double()
    G = len(index)
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, groups, torch.ones_like(r))
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, groups, r) / count
    dev = r - mean[groups]
    sq = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, groups, dev * dev)
    denom = (count - 1).clamp(min=1) if std == "unbiased" else count
    sd = (sq / denom).sqrt()
    adv = dev / (sd[groups] + eps)
    adv = torch.where(count[groups] > 1, adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype)


def has_spread(rewards: Sequence[float], prompt_ids: Sequence[Hashable]) -> list[bool]:
    """Per sample: does its group (samples sharing a prompt id) hold two different rewards? A group without spread
    has zero advantage, so its samples add only the KL term to an update (DAPO filters such groups out)."""
    seen: dict[Hashable, set] = {}
    for r, p in zip(rewards, prompt_ids):
        seen.setdefault(p, set()).add(float(r))
    return [len(seen[p]) > 1 for p in prompt_ids]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, added to a response's reward: 0 up to `max_new_tokens - buffer` tokens,
    then falling linearly to -factor at `max_new_tokens` (and -factor beyond). buffer 0 turns it off."""
    if buffer <= 0:
        return 0.0
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -factor * min(1.0, (length - start) / buffer)


@dataclass(frozen=True)
class BatchSize:
    """Response tokens and sequences of the global batch (one optimizer step) that a micro-batch belongs to."""
    tokens: int
    sequences: int


def masked_mean(x: Tensor, mask: Tensor, reduction: Literal["token_mean", "seq_mean"] = "token_mean",
                batch: BatchSize | None = None) -> Tensor:
    """token_mean: mean over all valid tokens; seq_mean: mean over sequences of per-sequence means. Rows with no
    valid token (pipeline fillers) count as no sequence. With `batch`, the sums are divided by the global batch's
    token / sequence count instead of this tensor's own (see the module docstring)."""
    mask = mask.to(x.dtype)
    if reduction == "token_mean":
        denom = mask.sum().clamp(min=1) if batch is None else batch.tokens
        return (x * mask).sum() / denom
    n = mask.sum(-1)
    per_seq = (x * mask).sum(-1) / n.clamp(min=1)
    denom = (n > 0).sum().clamp(min=1) if batch is None else batch.sequences
    return per_seq.sum() / denom


@dataclass
class LossOutput:
    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    entropy: Tensor
    clip_fraction: Tensor


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance sampling (TIS) for rollouts sampled by an engine that is not exactly the trainer's
    policy (FP8 weights, other kernels, a sampler's numerics): per token, w = min(pi_old(y) / pi_rollout(y), cap),
    where pi_old is the trainer's log-prob of the sampled token before the update. The policy-gradient term is
    weighted by w (no gradient through w). Returns (w, the untruncated ratio)."""
    ratio = torch.exp(old_logp - rollout_logp).detach()
    return ratio.clamp(max=cap), ratio


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 0.2,
                eps_high: float = 0.2, reduction: Literal["token_mean", "seq_mean"] = "token_mean",
                batch: BatchSize | None = None, is_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PPO-clip: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) per token; returns (loss, clip fraction).

    `advantages` is [N] (broadcast over the response) or [N, T]. eps_low != eps_high gives asymmetric clipping.
    `is_weights` [N, T] (truncated_is_weights) multiplies each token's term.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    clip_frac = masked_mean((clipped < unclipped).to(logp.dtype), mask, "token_mean", batch)
    return masked_mean(per_token, mask, reduction, batch), clip_frac.detach()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - 1 - (ref - logp) >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - 1.0 - d


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy [..., ] of the categorical distribution given by logits [..., V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sampled_entropy_surrogate(logp: Tensor) -> Tensor:
    """Per-token entropy bonus term from the sampled tokens' log-probs alone.

    The trainer never holds full-vocabulary logits (megatron's vocab-parallel cross-entropy returns the labels'
    log-probs), so the entropy itself is out of reach; its gradient is not: for y ~ pi,
    grad H = -E[(log pi(y) + 1) grad log pi(y)] = -E[log pi(y) grad log pi(y)], the expected gradient of
    -stopgrad(log pi(y)) * log pi(y). The value of this term is not the entropy (report -log pi(y) for that).
    """
    return -(logp.detach() * logp)


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 1e-3, entropy: Tensor | None = None,
              entropy_coef: float = 0.0, reduction: Literal["token_mean", "seq_mean"] = "token_mean",
              batch: BatchSize | None = None, is_weights: Tensor | None = None) -> LossOutput:
    """loss = PPO-clip (x truncated IS weights) + kl_coef * k3 KL - entropy_coef * entropy, all masked and reduced
    the same way."""
    pl, clip_frac = policy_loss(logp, old_logp, advantages, mask, eps_low, eps_high, reduction, batch, is_weights)
    zero = logp.new_zeros(())
    kl = masked_mean(kl_k3(logp, ref_logp), mask, reduction, batch) if ref_logp is not None else zero
    ent = masked_mean(entropy, mask, reduction, batch) if entropy is not None else zero
    loss = pl + kl_coef * kl - entropy_coef * ent
    return LossOutput(loss=loss, policy_loss=pl.detach(), kl=kl.detach(), entropy=ent.detach(),
                      clip_fraction=clip_frac)
