"""The update half of a period: scored samples -> advantages (over the whole batch) -> this DP rank's share of each
global batch -> its old and reference log-probs -> one optimizer step per global batch -> the period's metrics.
The pure parts (advantages, filters, shares) are batching.py's; the loss is loss.py's.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_spark.algorithm import BatchSize
from megatron_spark.batching import dp_share, global_batches, shaped_rewards
from megatron_spark.loss import GRPOLoss
from megatron_spark.period_metrics import PhaseTimes, RankWork, period_metrics
from megatron_spark.policy import Policy, Rollout
from megatron_spark.samples import Scored, ScoredSample
from megatron_spark.watchdog import FaultPlan


@dataclass
class TrainBatch:
    """This DP rank's part of one global batch (one optimizer step), and the size of the whole batch."""
    rollouts: list[Rollout]
    size: BatchSize


class PolicyUpdate:
    def __init__(self, cfg, policy: Policy, reference: Policy, layout, placement, rng: random.Random,
                 max_new_tokens: int, faults: FaultPlan):
        self.alg, self.training = cfg.algorithm, cfg.training
        self.policy, self.reference, self.layout, self.placement = policy, reference, layout, placement
        self.rng, self.max_new_tokens, self.faults = rng, max_new_tokens, faults
        self.dp_rank = layout.coords(dist.get_rank())["dp"]
        self.loss = GRPOLoss(cfg.algorithm)
        self.skipped: list[int] = []  # the updates since the guard last read them, in order: 1 = skipped

    def __call__(self, name: str, scored: Scored, step: int, version: int, rollout_s: float) -> dict:
        """Update on a period's samples; returns its metrics (without the weight sync's)."""
        t1 = time.perf_counter()
        alg = self.alg
        shaped = shaped_rewards(scored.rewards, scored.samples, self.max_new_tokens, alg.overlong_buffer,
                                alg.overlong_penalty_factor)
        t2 = time.perf_counter()
        batches = global_batches(scored.outs, shaped, self.training.global_batch_size, self.rng,
                                 advantage_std=alg.advantage_std, skip_zero_advantage=alg.skip_zero_advantage,
                                 mask_truncated=alg.mask_truncated)
        mine = [self.my_share(name, scored, b) for b in batches]
        real0, computed0, updates_at = self.policy.tokens_real, self.policy.tokens_computed, self.policy.optimizer_steps
        t_lp = time.perf_counter()
        drift = self.fill_logprobs(mine)
        t_lp = time.perf_counter() - t_lp
        train_metrics = self.train(mine, step)
        drift = max([drift] + [x.get("train_rollout_logprob_drift_max", 0.0) for x in train_metrics])
        t3 = time.perf_counter()
        self.skipped += [x["update_skipped"] for x in train_metrics]
        tasks = scored.tasks
        return period_metrics(name, [t.kind for t in tasks], [t.answer for t in tasks], scored.outs, scored.rewards,
                              shaped, drift, scored.built.prompt_mismatches(scored.outs), train_metrics,
                              self.replica_work(sum(len(b.rollouts) for b in mine), real0, computed0),
                              scored.metrics, PhaseTimes(rollout=rollout_s, reward=t2 - t1, logprobs=t_lp,
                                                         train=t3 - t2 - t_lp, sync=0.0),
                              trained_at=version, updates_at=updates_at)

    def my_share(self, name: str, scored: Scored, batch: list[ScoredSample]) -> TrainBatch:
        """This DP rank's samples of one global batch, as rollouts to compute on."""
        rollouts = []
        for x in dp_share(batch, self.layout.dp, self.dp_rank):
            b, task = scored.built[x.prompt], scored.tasks[x.prompt]
            rollouts.append(Rollout(b.input_ids, x.sample.token_ids, f"{name}:{task.id}", b.pixel_values,
                                    b.image_grid_thw, x.reward, x.advantage, rollout_logprobs=x.sample.logprobs,
                                    kind=task.kind))
        return TrainBatch(rollouts, BatchSize(tokens=sum(len(x.sample.token_ids) for x in batch),
                                              sequences=len(batch)))

    def fill_logprobs(self, batches: list[TrainBatch]) -> float:
        """Old (policy) and reference log-probs of this rank's samples only; returns the largest train/rollout
        log-prob difference over all ranks (a wrong weight sync shows here at once). The period's first optimizer
        step runs at the weights the old log-probs would come from: its samples need no old pass (`old_is_current`,
        their drift is checked in the update); with algorithm.old_logprobs=engine no sample needs one."""
        alg = self.alg
        rollouts = [r for b in batches for r in b.rollouts]
        skip = len(rollouts) if alg.old_logprobs == "engine" else len(batches[0].rollouts) if batches else 0
        for r in rollouts[:skip]:
            r.old_is_current = alg.old_logprobs == "recompute"
            if alg.old_logprobs == "engine":
                r.old_logprobs = torch.tensor(r.rollout_logprobs)
        rest = rollouts[skip:]
        computed = self.policy.token_logprobs(rest) if rest else []
        if alg.kl_coef > 0 and rollouts:
            self.reference.onload()
            for r, f in zip(rollouts, self.reference.token_logprobs(rollouts)):
                r.ref_logprobs = f
            if self.training.offload_reference:
                self.reference.offload()
        drift = 0.0
        for r, o in zip(rest, computed):
            r.old_logprobs = o
            if len(o) and r.rollout_logprobs is not None:  # (a counterfactual verdict has no engine log-probs)
                drift = max(drift, (o - torch.tensor(r.rollout_logprobs)).abs().max().item())
        t = torch.tensor([drift])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def train(self, batches: list[TrainBatch], step: int) -> list[dict]:
        """One optimizer step per global batch, the loss normalised as `algorithm.loss_normalization` says."""
        loss = self.loss.scaled(self.faults.loss_scale(step + 1))  # (1-based, as logged)
        return [self.policy.train_step(b.rollouts, loss.for_batch(b.size)) for b in batches]

    def replica_work(self, samples: int, real0: int, computed0: int) -> list[RankWork]:
        """What the first rank of each data-parallel replica did this period (a collective: all ranks)."""
        work = torch.tensor([float(samples), float(self.policy.tokens_real - real0),
                             float(self.policy.tokens_computed - computed0)])
        per_rank = [torch.zeros(3) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, work)
        return [RankWork(*(v.item() for v in per_rank[r])) for r in self.placement.replica_leaders(self.layout)]
