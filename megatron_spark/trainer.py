"""The SPARK loop on megatron-core + vLLM. One global step = an infer period on task prompts, recycling of its
rollouts into judge/reflection tasks, and a reward period whenever the FIFO holds a full batch.

    for step in steps:
        episode, batch = data.next_batch()             # task prompts
        groups = period("infer", batch)                # rollouts -> rewards -> advantages -> updates -> sync
                                                       # (each engine and DP rank does only its share: placement.py)
        queue.push(recycle(groups))                    # new verifiable tasks from the same rollouts
        if (aux := queue.pop_batch()) is not None:
            period("reward", aux)                      # same GRPO update on the auxiliary tasks
        log(); maybe_checkpoint()

A period is generation.py's `Sampler` (generate -> score [-> refill]) then update.py's `PolicyUpdate` (advantages
-> this rank's share -> log-probs -> optimizer steps) then the weight sync; the pure parts are batching.py's.
"""
from __future__ import annotations

import random
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spark.batching import recycle_groups
from megatron_spark.config import SparkConfig
from megatron_spark.generation import Sampler
from megatron_spark.offpolicy import InFlight, draw_round
from megatron_spark.policy import Rollout
from megatron_spark.recycle import AuxQueue, Group, RecycleSettings, recycle
from megatron_spark.samples import PromptCache, Scored, Task
from megatron_spark.stack import RLStack
from megatron_spark.step_metrics import step_metrics, sync_bytes
from megatron_spark.update import PolicyUpdate
from megatron_spark.watchdog import FaultPlan, NonFiniteGuard, StepBudget, StepWatchdog, StopRequest


class SparkTrainer:
    def __init__(self, cfg: SparkConfig, stack: RLStack, faults: FaultPlan = FaultPlan()):
        """`stack` is built by `megatron_spark.train.build_stack`; `faults`: what the e2e tests inject."""
        self.cfg, self.stack, self.faults = cfg, stack, faults
        self.policy, self.data, self.logger = stack.policy, stack.data, stack.logger
        self.rollouts = stack.rollouts  # generation and weight sync, colocated or on engines of their own
        self.rank = dist.get_rank()
        self.rng = random.Random(cfg.training.seed)  # (the batches' shuffles and recycling's draws, in order)
        self.recycle_settings = RecycleSettings.from_config(cfg.algorithm.recycle)
        self.queue = AuxQueue.from_config(cfg.algorithm.recycle)
        self.sampler = Sampler(cfg, stack.rollouts, stack.prompts, stack.rewards, stack.placement.reward_rank,
                               self.recycle_settings.samples_per_task, self.recycle_settings.counterfactual_verdicts)
        self.update = PolicyUpdate(cfg, stack.policy, stack.reference, stack.layout, stack.placement, self.rng,
                                   stack.rollouts.sampling.max_new_tokens, faults)
        self.inflight = InFlight(cfg.algorithm.max_staleness, self.sampler.receive)  # one-step off-policy's round
        self.stop = StopRequest(announce=stack.placement.writes(self.rank))
        self.budget = StepBudget(cfg.training.max_optimizer_steps)
        self.watchdog = StepWatchdog(cfg.training.hang_timeout_s)
        self.nonfinite = NonFiniteGuard(cfg.training.max_nonfinite_updates)
        self.version = self.engine_version = 0  # the weights at the start of step k are version k
        self.total_steps = 0
        self.stop.install()

    def state_parts(self) -> dict:
        """The trainer's own resumable state, by the name checkpoints store it under (beside the policy's)."""
        from megatron_spark.checkpoint import RandomState

        return {"cursor": self.data, "queue": self.queue, "trainer_rng": RandomState(self.rng),
                "nonfinite": self.nonfinite, "inflight": self.inflight}

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, start_step: int, total_steps: int, on_step=None) -> None:
        """Each step, its metrics (with the held-out evaluation when due) logged, then in order the agreement on a
        requested stop, the non-finite guard, `on_step` (the checkpoint) and the end conditions (the optimizer-step
        budget, a stop: watchdog.py's guards)."""
        bar = self.logger.progress(start_step, total_steps, "SPARK", unit="step")
        self.total_steps = total_steps
        self.version = self.engine_version = start_step  # (the engines were given the start weights)
        self.sampler.version, self.sampler.updates = start_step, self.policy.optimizer_steps
        evaluation = self.stack.evaluation  # the held-out evaluation when `eval.interval` is set, else None
        for step in range(start_step, total_steps):
            self.watchdog.arm()  # (re-armed each step: the step and its checkpoint must finish in time)
            self.faults.at_step(step + 1, self.rank)
            metrics = self.step(step)
            budget_spent = self.budget.spent(self.policy.optimizer_steps)
            if evaluation is not None and evaluation.due(step + 1, total_steps, last=budget_spent):
                self._engines_at_trained_weights()
                metrics.update(evaluation())
            self.logger.log(step + 1, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['infer/reward_mean']:.2f}",
                                judge=f"{metrics.get('reward/judge_accuracy', float('nan')):.2f}")
            stopping = self.stop.agree()
            # (after logging: the skipped updates are on record; the error is the same on every rank)
            flags, self.update.skipped = self.update.skipped, []
            self.nonfinite.record(flags, step + 1)
            if on_step is not None:
                on_step(step + 1, metrics, stopping)
            if stopping:
                self.stop.stop_after(step + 1)
                break
            if budget_spent:
                if self.stack.placement.writes(self.rank):
                    print(f"stopping after step {step + 1}: {self.policy.optimizer_steps} optimizer steps (budget)",
                          flush=True)
                break
        self.watchdog.disarm()
        if bar is not None:
            bar.close()

    def step(self, step: int) -> dict:
        """One RL step: the infer period on the next prompts, their groups recycled into the queue, the reward
        period when the queue holds a batch; returns the step's metrics. (algorithm.max_staleness=1:
        `overlapped_step`.)"""
        self.version = self.sampler.version = step
        if self.cfg.algorithm.max_staleness:
            return self.overlapped_step(step)
        t0 = time.perf_counter()
        episode, batch = self.data.next_batch()
        self.queue.start_episode(episode)
        tasks = [Task.from_example(episode, ex) for ex in batch]
        metrics, groups = self.period("infer", tasks, step, more=self._more_prompts)
        self.queue.push(recycle(groups, self.stack.templates, self.recycle_settings, self.rng))
        aux = self.queue.pop_batch()
        if aux is not None:
            drawn = [len(aux)]
            m2, _ = self.period("reward", self._aux_tasks(aux, step), step, more=lambda: self._more_aux(step, drawn))
            metrics.update(m2)
        return metrics | self._step_metrics(episode, aux is not None, time.perf_counter() - t0)

    def period(self, name: str, tasks: list[Task], step: int, more=None) -> tuple[dict, list[Group]]:
        """generate (this engine's prompts) -> score (once) [-> refill] -> update (this DP rank's share) -> sync.
        Returns the period's metrics and its groups for recycling."""
        t0 = time.perf_counter()
        scored = self.sampler.sample(name, tasks, step, more)
        self.rollouts.sleep()
        m, groups = self._update(name, scored, step, rollout_s=time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.rollouts.push()
        self.sampler.updates = self.policy.optimizer_steps
        m[f"time/{name}_sync"] = time.perf_counter() - t0
        return m | sync_bytes(name, self.rollouts.sync.stats), groups

    def _update(self, name: str, scored: Scored, step: int, rollout_s: float) -> tuple[dict, list[Group]]:
        groups = self._recycle(scored)
        metrics = self.update(name, scored, step, self.version, rollout_s)
        t = scored.tasks
        self.logger.samples(step + 1, name, [x.kind for x in t], [x.question for x in t], [x.answer for x in t],
                            [[s.text for s in g] for g in scored.outs], scored.rewards)
        return metrics, groups

    def overlapped_step(self, step: int) -> dict:
        """One-step off-policy: this step's samples were generated during the previous step with that step's
        weights (the run's first step generates its own), and the next step's are generated while this one trains.

            round = the round in flight                       # generated with version step-1
            push(version step)                                # the engines are idle: the one exposed transfer
            score(round); queue.push(recycle(its infer groups))
            submit(the next round)                            # infer prompts + the queue's next reward batch
            update("infer", round); update("reward", round)   # while the engines generate the next round
        """
        t0 = time.perf_counter()
        rnd = self.inflight.take() or self._submit_round(step)
        parts = rnd.result(self.sampler.receive)
        built = rnd.prompts or [PromptCache(self.stack.prompts, tasks) for _, tasks, _, _ in parts]
        wait_s = time.perf_counter() - t0  # (generation not hidden behind the previous step's training)
        t1 = time.perf_counter()
        if self.engine_version != step:
            self.rollouts.push()
            self.engine_version, self.sampler.updates = step, self.policy.optimizer_steps
        sync_s = time.perf_counter() - t1
        # (of the last sync: a resumed run's first was made at its start)
        synced = sync_bytes("infer", self.rollouts.sync.stats)
        probe = self._sync_probe(parts[0][1], built[0], step)
        scored = []
        for (name, tasks, outs, gen_metrics), prompts in zip(parts, built):
            t = time.perf_counter()
            rewards = self.sampler.scored_rewards(name, tasks, outs, gen_metrics)
            scored.append((name, Scored(tasks, prompts, outs, rewards, gen_metrics), time.perf_counter() - t))
        self.queue.push(recycle(self._recycle(scored[0][1]), self.stack.templates, self.recycle_settings, self.rng))
        if step + 1 < self.total_steps:
            self.inflight.round = self._submit_round(step + 1)
        metrics = {"policy_version": step, "sync/logprob_drift_max": probe, "time/generation_wait": wait_s,
                   **synced}
        for name, s, score_s in scored:
            m, _ = self._update(name, s, step, rollout_s=wait_s if name == "infer" else 0.0)
            m[f"time/{name}_reward"] += score_s
            m[f"time/{name}_sync"] = sync_s if name == "infer" else 0.0
            metrics.update(m)
        return metrics | self._step_metrics(rnd.episode, len(parts) > 1, time.perf_counter() - t0)

    # -- the loop's parts ----------------------------------------------------------------------------------------
    def _engines_at_trained_weights(self) -> None:
        """Before an evaluation. One-step off-policy: the round in flight is received (kept for the next step) and
        the engines get the weights this step trained, so the evaluation sees them (the next step then has none
        to push). Synchronous: the period's sync did this already."""
        if self.inflight.round is not None:
            self.inflight.round.result(self.sampler.receive)
        if self.cfg.algorithm.max_staleness and self.engine_version != self.version + 1:
            self.rollouts.push()
            self.engine_version, self.sampler.updates = self.version + 1, self.policy.optimizer_steps

    def _submit_round(self, step: int):
        """Draw step `step`'s prompts (offpolicy.draw_round) and hand them to the engines, which generate them with
        the weights they hold now."""
        rnd = draw_round(step, self.data, self.queue, self._aux_tasks, self.engine_version)
        rnd.prompts = [PromptCache(self.stack.prompts, tasks) for _, tasks in rnd.parts]
        rnd.ticket = self.sampler.request([(n, t, b, 0) for (n, t), b in zip(rnd.parts, rnd.prompts)], step)
        return rnd

    def _more_prompts(self) -> list[Task]:
        episode, batch = self.data.next_batch()
        return [Task.from_example(episode, ex) for ex in batch]

    def _aux_tasks(self, aux: list, step: int, first: int = 0) -> list[Task]:
        pixels = self.recycle_settings.max_pixels
        return [Task.from_aux(f"s{step}-{first + i}", t, pixels) for i, t in enumerate(aux)]

    def _more_aux(self, step: int, drawn: list[int]) -> Optional[list[Task]]:
        """The queue's next recycled batch, numbered on from the `drawn[0]` tasks this step has taken."""
        aux = self.queue.pop_batch()
        if aux is None:
            return None
        tasks = self._aux_tasks(aux, step, drawn[0])
        drawn[0] += len(aux)
        return tasks

    def _sync_probe(self, tasks: list[Task], cache: PromptCache, step: int, prompts: int = 2, tokens: int = 8
                    ) -> float:
        """The weight sync checked on the weights the engines now hold (the trainer's): a few greedy samples, their
        log-probs from the engines against the trainer's (max |difference| over tokens; fp32: ~1e-6)."""
        built, tasks = cache.select(tasks, list(range(min(prompts, len(tasks))))), tasks[:prompts]
        greedy = dict(n=1, temperature=0.0, max_new_tokens=min(tokens, self.rollouts.sampling.max_new_tokens))
        ticket = self.sampler.request([("probe", tasks, built, 0)], step, overrides=greedy)
        outs, _ = self.sampler.receive([("probe", len(tasks))], ticket, self.version)[0]
        pairs = [(Rollout(built[i].input_ids, s.token_ids, f"probe:{i}", built[i].pixel_values,
                          built[i].image_grid_thw), s) for i, g in enumerate(outs) for s in g if s.token_ids]
        logps = self.policy.token_logprobs([r for r, _ in pairs]) if pairs else []
        return max([0.0] + [(lp - torch.tensor(s.logprobs)).abs().max().item() for (_, s), lp in zip(pairs, logps)])

    def _recycle(self, scored: Scored) -> list[Group]:
        tok = self.stack.prompts.tokenizer
        return recycle_groups(scored.tasks, scored.outs, scored.rewards,
                              lambda ids: tok.decode(ids, skip_special_tokens=True))

    def _step_metrics(self, episode: int, reward_period: bool, step_s: float) -> dict:
        return step_metrics(episode, len(self.queue), reward_period, step_s, self.policy.optimizer_steps)
