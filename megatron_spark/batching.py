"""From a period's scored samples to each data-parallel rank's share of each optimizer step: pure functions, the
same on every rank (every rank holds every reward), unit-tested without a model.

    shaped_rewards      the verifier's rewards (+ DAPO's overlong penalty)
    group_spread        per group: two different rewards? (dynamic sampling, skip_zero_advantage)
    dynamic_keep        which groups a period keeps after refills
    global_batches      advantages (per group), filters, shuffle, cut into optimizer steps
    dp_share            one DP rank's samples of a global batch, longest first
    recycle_groups      per prompt: its decoded responses and rewards, for recycling
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from megatron_spark.algorithm import group_advantages, has_spread, overlong_penalty
from megatron_spark.placement import balanced_partition
from megatron_spark.recycle import Group
from megatron_spark.samples import ScoredSample, Task


def shaped_rewards(rewards: list[float], samples: Sequence, max_new_tokens: int, overlong_buffer: int,
                   factor: float) -> list[float]:
    """The rewards advantages are computed from: the verifier's, plus DAPO's soft overlong penalty when
    `overlong_buffer` (algorithm.overlong_buffer) is set. The verifier's 0/1 still drives recycling."""
    if not overlong_buffer:
        return list(rewards)
    return [r + overlong_penalty(len(s.token_ids), max_new_tokens, overlong_buffer, factor)
            for r, s in zip(rewards, samples)]


def group_spread(outs: Sequence[Sequence], rewards: Sequence[float]) -> list[bool]:
    """Per group (a prompt's samples): does it hold two different rewards?"""
    ids = [i for i, g in enumerate(outs) for _ in g]
    first: dict[int, bool] = {}
    for i, ok in zip(ids, has_spread(rewards, ids)):
        first.setdefault(i, ok)
    return [first.get(i, False) for i in range(len(outs))]


def dynamic_keep(spread: Sequence[bool], target: int) -> list[int]:
    """The groups a period keeps after dynamic sampling's refills: the first `target` with reward spread, in
    generation order; when rounds (or prompts) ran out before that, the batch keeps its size with groups without
    spread, again the first ones. Sorted."""
    keep = [i for i, ok in enumerate(spread) if ok][:target]
    if len(keep) < target:
        keep += [i for i, ok in enumerate(spread) if not ok][:target - len(keep)]
    return sorted(keep)


def global_batches(outs: Sequence[Sequence], rewards: list[float], batch_size: int, rng: random.Random, *,
                   advantage_std: str = "unbiased", skip_zero_advantage: bool = False,
                   mask_truncated: bool = False) -> list[list[ScoredSample]]:
    """Every sample with its group-normalised advantage, filtered (groups without spread with
    `skip_zero_advantage`; responses cut at the length limit with `mask_truncated`: they still count in their group's
    advantage), shuffled with `rng` and cut into global batches of `batch_size` (one optimizer step each; a
    remainder smaller than a batch is dropped)."""
    flat = [(i, s) for i, g in enumerate(outs) for s in g]
    ids = [i for i, _ in flat]
    adv = group_advantages(torch.tensor(rewards), ids, advantage_std).tolist()
    keep = has_spread(rewards, ids) if skip_zero_advantage else [True] * len(flat)
    if mask_truncated:  # cut at the length limit: no reward signal about the answer it never gave
        keep = [k and s.finish_reason != "length" for k, (_, s) in zip(keep, flat)]
    items = [ScoredSample(i, s, r, a) for (i, s), r, a, k in zip(flat, rewards, adv, keep) if k]
    rng.shuffle(items)
    return [items[j:j + batch_size] for j in range(0, len(items) - batch_size + 1, batch_size)]


def dp_share(batch: Sequence[ScoredSample], dp: int, dp_rank: int) -> list[ScoredSample]:
    """One DP rank's samples of a global batch: a split balanced by cost (sequence length), longest first, so that
    micro-batches (fixed-size or under a token budget) hold sequences of similar length and little of what is
    computed is padding. (The loss is a sum over the batch: the order does not change it.)"""
    costs = [x.tokens for x in batch]
    part = sorted(balanced_partition(costs, dp)[dp_rank], key=lambda j: (-costs[j], j))
    return [batch[j] for j in part]


def recycle_groups(tasks: Sequence[Task], outs: Sequence[Sequence], rewards: Sequence[float],
                   decode: Callable[[list[int]], str]) -> list[Group]:
    """Per prompt: its responses and rewards, for recycling. `decode` must drop special tokens: recycled prompts
    quote responses, and a sampled <|image_pad|> (or any chat-control token) must never become markup."""
    groups, k = [], 0
    for t, g in zip(tasks, outs):
        groups.append(Group(t.id, t.question, t.answer, [decode(s.token_ids) for s in g],
                            list(rewards[k:k + len(g)]), t.image))
        k += len(g)
    return groups


def assemble(name: str, n: int, works: Sequence) -> tuple[list, dict]:
    """The samples of `n` prompts, put back in prompt order from the engines' shares (`rollout.remote.EngineWork`),
    and the generation's per-engine metrics."""
    outs: list[Optional[list]] = [None] * n
    counts, times = [], []
    for w in works:
        for i, s in zip(w.prompts, w.samples):
            outs[i] = s
        counts.append(sum(len(s) for s in w.samples))
        times.append(w.seconds)
    missing = [i for i, o in enumerate(outs) if o is None]
    if missing:
        raise RuntimeError(f"prompts {missing[:5]} were generated by no engine (placement bug)")
    return outs, {f"{name}/samples_generated": sum(counts), f"{name}/engine_samples_min": min(counts),
                  f"{name}/engine_samples_max": max(counts), f"time/{name}_engine_rollout_max": max(times),
                  f"time/{name}_engine_rollout_mean": sum(times) / len(times)}
