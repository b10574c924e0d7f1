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
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spark.algorithm import BatchSize, group_advantages, has_spread, overlong_penalty
from megatron_spark.config import SparkConfig
from megatron_spark.period_metrics import PhaseTimes, RankWork, period_metrics
from megatron_spark.placement import RolloutPlacement, balanced_partition, sampling_seed
from megatron_spark.policy import Rollout, grpo_loss_fn
from megatron_spark.recycle import AuxQueue, AuxTask, Group, RecycleSettings, recycle
from megatron_spark.rollout.engine import RolloutRequest, Sample
from megatron_spark.rollout.remote import EngineWork, GenerationPart
from megatron_spark.stack import RLStack
from megatron_spark.watchdog import (NonFiniteGuard, StepBudget, StepWatchdog, StopRequest, inject_step_faults,
                                     nonfinite_loss_at)


@dataclass
class Task:
    """A prompt to roll out: a data record or a recycled auxiliary task."""
    id: str
    messages: list[dict]
    answer: str
    image: Optional[str]
    question: str
    kind: str = "task"

    @classmethod
    def from_aux(cls, i: str, t: AuxTask, max_pixels: int) -> "Task":
        msgs = json.loads(t.to_record(max_pixels)["message"])
        return cls(i, msgs, t.answer, t.image, t.prompt, t.kind)


@dataclass
class TrainBatch:
    """This DP rank's part of one global batch (one optimizer step), and the size of the whole batch."""
    rollouts: list[Rollout]
    size: BatchSize


class PromptCache:
    """Chat template + image processing per prompt, done only for the prompts this rank needs (its engine's share
    and the samples it trains on), once each."""

    def __init__(self, builder, tasks: list[Task]):
        self.builder, self.tasks, self.done = builder, tasks, {}

    def __getitem__(self, i: int) -> dict:
        if i not in self.done:
            self.done[i] = self.builder.build(self.tasks[i].messages)
        return self.done[i]

    def select(self, tasks: list[Task], indices: list[int]) -> "PromptCache":
        """The cache of `tasks` (a longer list this cache was not built for) restricted to `indices`: prompts
        already built keep their work (dynamic sampling's kept groups)."""
        out = PromptCache(self.builder, [tasks[i] for i in indices])
        out.done = {k: self.done[i] for k, i in enumerate(indices) if i in self.done}
        return out

    def prompt_mismatches(self, outs: list) -> int:
        """Samples whose prompt tokens (as vLLM saw them) differ from the trainer's, over the prompts built here;
        summed over all ranks."""
        n = sum(int(s.prompt_token_ids != b["input_ids"]) for i, b in self.done.items() for s in outs[i])
        t = torch.tensor([float(n)])
        dist.all_reduce(t)
        return int(t.item())


@dataclass
class Round:
    """One-step off-policy: one step's prompts handed to the engines and, once received, their samples."""
    step: int                               # the step that trains on it
    version: int                            # the policy version (step) whose weights generate it
    episode: int
    parts: list[tuple[str, list[Task]]]     # ("infer", tasks) and, when the queue held a batch, ("reward", tasks)
    ticket: Optional[int] = None
    received: Optional[list[tuple[list, dict]]] = None  # per part: samples per task, generation metrics
    prompts: Optional[list["PromptCache"]] = None       # per part: the prompts built for the request (not saved)

    def result(self, trainer: "SparkTrainer") -> list[tuple[str, list[Task], list, dict]]:
        """(name, tasks, samples, generation metrics) per part, waiting for the engines the first time."""
        if self.received is None:
            self.received = trainer.receive([(n, len(t)) for n, t in self.parts], self.ticket, self.version)
            self.ticket = None
        return [(n, t, outs, m) for (n, t), (outs, m) in zip(self.parts, self.received)]


class InFlight:
    """The round in flight as a checkpoint part: saving waits for the engines (a collective of the training ranks)
    and stores its prompts and samples, so a resumed run trains on exactly them. (None without one: synchronous
    runs; checkpoints written before this part existed have none either.)"""
    optional = True

    def __init__(self, trainer: "SparkTrainer"):
        self.trainer = trainer

    def state_dict(self) -> Optional[dict]:
        r = self.trainer.inflight
        if r is None:
            return None
        received = r.result(self.trainer)
        return {"step": r.step, "version": r.version, "episode": r.episode,
                "parts": [(n, [asdict(t) for t in tasks]) for n, tasks in r.parts],
                "received": [([[asdict(s) for s in g] for g in outs], m) for _, _, outs, m in received]}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None:
            self.trainer.inflight = None
            return
        if not self.trainer.cfg.algorithm.max_staleness:  # its prompts are already drawn: they would be lost
            raise ValueError("config field 'algorithm.max_staleness': the checkpoint holds a round generated ahead "
                             "by a one-step off-policy run (max_staleness=1); resume it with max_staleness=1 (its "
                             "prompts were drawn from the data and the recycling queue already)")
        parts = [(n, [Task(**t) for t in tasks]) for n, tasks in state["parts"]]
        received = [([[Sample(**s) for s in g] for g in outs], m) for outs, m in state["received"]]
        self.trainer.inflight = Round(state["step"], state["version"], state["episode"], parts, None, received)


class SparkTrainer:
    def __init__(self, cfg: SparkConfig, stack: RLStack):
        """`stack` is built by `megatron_spark.train.build_stack` (layout, models, engine, data...)."""
        self.cfg = cfg
        self.shape = stack.shape
        self.layout = stack.layout
        self.placement: RolloutPlacement = stack.placement
        self.prompts = stack.prompts
        self.data = stack.data
        self.policy = stack.policy
        self.reference = stack.reference
        self.rollouts = stack.rollouts  # generation and weight sync, colocated or on engines of their own
        self.reward_pool = stack.rewards
        self.templates = stack.templates
        self.logger = stack.logger
        self.evaluation = stack.evaluation  # the held-out evaluation when `eval.interval` is set, else None
        self.rank = dist.get_rank()
        self.dp_rank = self.layout.coords(self.rank)["dp"]
        self.rng = random.Random(cfg.training.seed)
        self.recycle_settings = RecycleSettings.from_config(cfg.algorithm.recycle)
        self.queue = AuxQueue.from_config(cfg.algorithm.recycle)
        self.stop = StopRequest(announce=self.placement.writes(self.rank))
        self.budget = StepBudget(cfg.training.max_optimizer_steps)
        self.watchdog = StepWatchdog(cfg.training.hang_timeout_s)
        self.nonfinite = NonFiniteGuard(cfg.training.max_nonfinite_updates)
        self.update_flags: list[int] = []  # this step's updates, in order: 1 = skipped as non-finite
        # policy versions: the weights at the start of step k are version k; the engines hold `engine_version`
        self.version = self.engine_version = self.engine_updates = 0
        self.total_steps = 0
        self.inflight: Optional[Round] = None  # one-step off-policy: the round the engines generate meanwhile
        self.stop.install()

    def state_parts(self) -> dict:
        """The trainer's own resumable state, by the name checkpoints store it under (beside the policy's)."""
        from megatron_spark.checkpoint import RandomState

        return {"cursor": self.data, "queue": self.queue, "trainer_rng": RandomState(self.rng),
                "nonfinite": self.nonfinite, "inflight": InFlight(self)}

    # -- the stages of a period, in order -----------------------------------------------------------------------
    def request(self, parts: list[tuple[str, list[Task], "PromptCache", int]], step: int,
                overrides: Optional[dict] = None) -> int:
        """Ask the engines for samples of each (period, tasks, their prompts, refill round): each engine generates
        only its share of each part's prompts (a prompt's n samples stay on one engine). Returns a ticket."""
        seed, aux_n = self.cfg.training.seed, self.recycle_settings.samples_per_task

        def part(name: str, tasks: list[Task], built: PromptCache, rnd: int) -> GenerationPart:
            # (the reward period's group size: algorithm.recycle.samples_per_task when set)
            sampling = {"n": aux_n} if name == "reward" and aux_n else {}
            return GenerationPart(len(tasks), lambda i: RolloutRequest(built[i]["prompt"], built[i]["images"]),
                                  lambda engine: sampling_seed(seed, step, name, engine, rnd),
                                  {**sampling, **(overrides or {})})
        return self.rollouts.submit([part(*p) for p in parts])  # (sampled as the rollouts' `Sampling` says)

    def receive(self, names: list[tuple[str, int]], ticket: int, version: int) -> list[tuple[list, dict]]:
        """The samples of each (period, number of prompts) of request `ticket`, every rank holding all of them in
        prompt order, each stamped with the policy `version` that generated it (and the optimizer steps of the
        weights the engines hold); and the generation's metrics."""
        out = []
        for (name, n), works in zip(names, self.rollouts.collect(ticket)):
            outs, metrics = self._assemble(name, n, works)
            for s in (s for g in outs for s in g):
                s.version, s.updates = version, self.engine_updates
            out.append((outs, metrics))
        return out

    def generate(self, name: str, tasks: list[Task], built: "PromptCache", step: int, round: int = 0
                 ) -> tuple[list, dict]:
        """generate now, at the weights the engines hold (the trainer's: synchronous)."""
        return self.receive([(name, len(tasks))], self.request([(name, tasks, built, round)], step),
                            self.version)[0]

    @staticmethod
    def _assemble(name: str, n: int, works: list[EngineWork]) -> tuple[list, dict]:
        outs: list = [None] * n
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

    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        """Rewards once per sample, on rank 0 (one process pool), broadcast to all ranks."""
        src = self.placement.reward_rank
        box = [self.reward_pool.score(responses, golds) if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def sample(self, name: str, tasks: list[Task], step: int, more=None
               ) -> tuple[list[Task], "PromptCache", list, list[float], dict]:
        """generate -> score. With algorithm.dynamic_sampling, groups whose rewards are all equal are discarded and
        `more()` (the next prompts, or None when there are none) is generated and scored too, until the period holds
        as many groups with reward spread as it started with or `dynamic_sampling_rounds` rounds are spent; the
        first groups with spread, in generation order, are kept. Every rank decides alike (all hold all rewards)."""
        alg = self.cfg.algorithm
        built = PromptCache(self.prompts, tasks)
        outs, metrics = self.generate(name, tasks, built, step)
        rewards = self._score_outs(tasks, outs)
        if not alg.dynamic_sampling:
            return tasks, built, outs, rewards, metrics
        target, rounds = len(tasks), 1
        first_mean, first_spread = sum(rewards) / max(1, len(rewards)), sum(self._spread(outs, rewards))
        while rounds < alg.dynamic_sampling_rounds and sum(self._spread(outs, rewards)) < target:
            extra = more() if more is not None else None
            if not extra:
                break
            extra_built = PromptCache(self.prompts, extra)
            extra_outs, m = self.generate(name, extra, extra_built, step, round=rounds)
            for k, v in m.items():  # samples and times add up over the rounds (per engine: each round's shares
                metrics[k] += v     # are fixed by the placement, so min and max add up as well)
            rewards = rewards + self._score_outs(extra, extra_outs)
            extra_built.done = {i + len(tasks): b for i, b in extra_built.done.items()}
            built.done.update(extra_built.done)
            tasks, outs, rounds = tasks + list(extra), outs + extra_outs, rounds + 1
        spread = self._spread(outs, rewards)
        keep = [i for i, ok in enumerate(spread) if ok][:target]
        with_spread = len(keep)
        if with_spread < target:  # rounds (or recycled tasks) ran out: the batch keeps its size, the rest of it
            keep += [i for i, ok in enumerate(spread) if not ok][:target - with_spread]  # without spread
            keep.sort()
        flat = [r for i, g in enumerate(outs) for r in [i] * len(g)]
        metrics.update({f"{name}/sampling_rounds": rounds, f"{name}/groups_generated": len(tasks),
                        f"{name}/groups_kept": with_spread,
                        f"{name}/groups_filled_without_spread": len(keep) - with_spread,
                        f"{name}/groups_discarded": len(tasks) - len(keep),
                        f"{name}/groups_target": target, f"{name}/reward_mean_first_round": first_mean,
                        f"{name}/groups_with_spread_first_round": first_spread})
        kept = set(keep)
        kept_rewards = [r for r, i in zip(rewards, flat) if i in kept]
        return [tasks[i] for i in keep], built.select(tasks, keep), [outs[i] for i in keep], kept_rewards, metrics

    def _score_outs(self, tasks: list[Task], outs: list) -> list[float]:
        return self.score([s.text for g in outs for s in g], [t.answer for t, g in zip(tasks, outs) for _ in g])

    @staticmethod
    def _spread(outs: list, rewards: list[float]) -> list[bool]:
        """Per group: does it hold two different rewards?"""
        ids = [i for i, g in enumerate(outs) for _ in g]
        per_sample = has_spread(rewards, ids)
        first = {}
        for i, ok in zip(ids, per_sample):
            first.setdefault(i, ok)
        return [first.get(i, False) for i in range(len(outs))]

    def groups(self, tasks: list[Task], outs: list, rewards: list[float]) -> list[Group]:
        """Per prompt: its responses and rewards, for recycling. Recycled prompts quote responses: decode them
        without special tokens, so a sampled <|image_pad|> (or any chat-control token) never becomes markup."""
        tok, groups, k = self.prompts.tokenizer, [], 0
        for t, group in zip(tasks, outs):
            groups.append(Group(t.id, t.question, t.answer,
                                [tok.decode(s.token_ids, skip_special_tokens=True) for s in group],
                                rewards[k:k + len(group)], t.image))
            k += len(group)
        return groups

    def shaped(self, rewards: list[float], samples: list) -> list[float]:
        """The rewards the advantages are computed from: the verifier's, plus DAPO's soft overlong penalty when
        `algorithm.overlong_buffer` is set."""
        alg = self.cfg.algorithm
        if not alg.overlong_buffer:
            return rewards
        return [r + overlong_penalty(len(s.token_ids), self.rollouts.sampling.max_new_tokens, alg.overlong_buffer,
                                     alg.overlong_penalty_factor) for r, s in zip(rewards, samples)]

    def global_batches(self, outs: list, rewards: list[float]) -> list[list[tuple]]:
        """Every sample as (prompt index, sample, reward, advantage), shuffled (the same on every rank) and cut into
        global batches of `training.global_batch_size` (one optimizer step each)."""
        alg = self.cfg.algorithm
        flat = [(i, s, rewards[k]) for k, (i, s) in enumerate((i, s) for i, g in enumerate(outs) for s in g)]
        adv = group_advantages(torch.tensor(rewards), [i for i, _, _ in flat], alg.advantage_std)
        items = [(i, s, r, a) for (i, s, r), a in zip(flat, adv.tolist())]
        keep = [True] * len(items)
        if alg.skip_zero_advantage:  # groups whose rewards are all equal teach nothing but KL
            keep = has_spread(rewards, [i for i, _, _ in flat])
        if alg.mask_truncated:  # cut at the length limit: no reward signal about the answer it never gave
            keep = [k and s.finish_reason != "length" for k, (_, s, _) in zip(keep, flat)]
        items = [x for x, k in zip(items, keep) if k]
        self.rng.shuffle(items)
        gbs = self.cfg.training.global_batch_size
        return [items[j:j + gbs] for j in range(0, len(items) - gbs + 1, gbs)]

    def my_share(self, name: str, tasks: list[Task], built: "PromptCache", batch: list[tuple]) -> TrainBatch:
        """This DP rank's samples of one global batch: a cost-balanced split (sequence length) over DP ranks."""
        costs = [len(s.prompt_token_ids) + len(s.token_ids) for _, s, _, _ in batch]
        # longest first: micro-batches (fixed-size or under a token budget) then hold sequences of similar length,
        # so little of what is computed is padding; the loss is a sum over the batch, so the order does not matter
        part = sorted(balanced_partition(costs, self.layout.dp)[self.dp_rank], key=lambda j: (-costs[j], j))
        rollouts = []
        for j in part:
            i, s, reward, advantage = batch[j]
            b = built[i]
            rollouts.append(Rollout(b["input_ids"], s.token_ids, f"{name}:{tasks[i].id}", b["pixel_values"],
                                    b["image_grid_thw"], reward, advantage, rollout_logprobs=s.logprobs,
                                    kind=tasks[i].kind))
        return TrainBatch(rollouts, BatchSize(tokens=sum(len(s.token_ids) for _, s, _, _ in batch),
                                              sequences=len(batch)))

    def fill_logprobs(self, batches: list[TrainBatch]) -> float:
        """Old (policy) and reference log-probs of this rank's samples only; returns the largest train/rollout
        log-prob difference over all ranks (a wrong weight sync shows here at once). The period's first optimizer
        step runs at the weights the old log-probs would come from: its samples need no old pass (`old_is_current`,
        their drift is checked in the update); with algorithm.old_logprobs=engine no sample needs one."""
        alg, tr = self.cfg.algorithm, self.cfg.training
        rollouts = [r for b in batches for r in b.rollouts]
        skip = len(rollouts) if alg.old_logprobs == "engine" else len(batches[0].rollouts) if batches else 0
        for r in rollouts[:skip]:
            r.old_is_current = alg.old_logprobs == "recompute"
            if alg.old_logprobs == "engine":
                r.old_logprobs = torch.tensor(r.rollout_logprobs)
        rest = rollouts[skip:]
        computed = self.policy.token_logprobs(rest) if rest else []
        ref = [None] * len(rollouts)
        if alg.kl_coef > 0 and rollouts:
            self.reference.onload()
            ref = self.reference.token_logprobs(rollouts)
            if tr.offload_reference:
                self.reference.offload()
        for r, f in zip(rollouts, ref):
            r.ref_logprobs = f
        drift = 0.0
        for r, o in zip(rest, computed):
            r.old_logprobs = o
            if len(o):
                drift = max(drift, (o - torch.tensor(r.rollout_logprobs)).abs().max().item())
        t = torch.tensor([drift])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def train(self, batches: list[TrainBatch], step: int) -> list[dict]:
        alg = self.cfg.algorithm
        poison = nonfinite_loss_at(step + 1)  # (tests: a non-finite loss injected at this step, 1-based as logged)

        def loss(size=None):
            fn = grpo_loss_fn(alg, size) if size is not None else grpo_loss_fn(alg)
            if poison is None:
                return fn
            return lambda logp, mb: (lambda out: (out[0] * poison, out[1]))(fn(logp, mb))
        if alg.loss_normalization == "global_batch":
            return [self.policy.train_step(b.rollouts, loss(b.size), share_of_batch=True) for b in batches]
        return [self.policy.train_step(b.rollouts, loss()) for b in batches]

    # -- one period ---------------------------------------------------------------------------------------------
    def period(self, name: str, tasks: list[Task], step: int, more=None) -> tuple[dict, list[Group]]:
        """generate (this engine's prompts) -> score (once) [-> refill: dynamic sampling] -> advantages (global) ->
        this DP rank's share -> its log-probs -> updates -> weight sync. `more()`: the next prompts for a refill."""
        t0 = time.perf_counter()
        tasks, built, outs, rewards, gen_metrics = self.sample(name, tasks, step, more)
        self.rollouts.sleep()
        rollout_s = time.perf_counter() - t0
        m, groups = self.update(name, tasks, built, outs, rewards, gen_metrics, step, rollout_s)
        t0 = time.perf_counter()
        self.rollouts.push()
        self.engine_updates = self.policy.optimizer_steps
        m[f"time/{name}_sync"] = time.perf_counter() - t0
        m.update(self._sync_bytes(name))
        return m, groups

    def _sync_bytes(self, name: str) -> dict:
        """Bytes the last weight sync moved between processes and copied within them, summed over the trainer's
        ranks (a collective); with whole HF tensors ('hf_full') every rollout rank receives the whole model once."""
        stats = self.rollouts.sync.stats
        t = torch.tensor([float(stats.bytes_sent), float(stats.bytes_local)])
        dist.all_reduce(t)
        return {f"{name}/sync_bytes_sent": t[0].item(), f"{name}/sync_bytes_local": t[1].item()}

    def update(self, name: str, tasks: list[Task], built: "PromptCache", outs: list, rewards: list[float],
               gen_metrics: dict, step: int, rollout_s: float) -> tuple[dict, list[Group]]:
        """Scored samples -> advantages (global) -> this DP rank's share -> its log-probs -> updates; returns the
        period's metrics (without the sync's time) and its groups for recycling."""
        t1 = time.perf_counter()
        shaped = self.shaped(rewards, [s for g in outs for s in g])
        t2 = time.perf_counter()
        groups = self.groups(tasks, outs, rewards)  # (recycling and the accuracy metrics: the verifier's 0/1)
        mine = [self.my_share(name, tasks, built, b) for b in self.global_batches(outs, shaped)]
        my_rollouts = [r for b in mine for r in b.rollouts]
        real0, computed0 = self.policy.tokens_real, self.policy.tokens_computed
        updates_at = self.policy.optimizer_steps
        t_lp = time.perf_counter()
        drift = self.fill_logprobs(mine)
        t_lp = time.perf_counter() - t_lp
        train_metrics = self.train(mine, step)
        drift = max([drift] + [x.get("train_rollout_logprob_drift_max", 0.0) for x in train_metrics])
        t3 = time.perf_counter()
        self.update_flags += [x["update_skipped"] for x in train_metrics]  # (the non-finite guard reads these)
        self.logger.samples(step + 1, name, [t.kind for t in tasks], [t.question for t in tasks],
                            [t.answer for t in tasks], [[s.text for s in g] for g in outs], rewards)
        m = period_metrics(name, [t.kind for t in tasks], [t.answer for t in tasks], outs, rewards, shaped, drift,
                           built.prompt_mismatches(outs), train_metrics,
                           self._replica_work(len(my_rollouts), real0, computed0), gen_metrics,
                           PhaseTimes(rollout=rollout_s, reward=t2 - t1, logprobs=t_lp, train=t3 - t2 - t_lp,
                                      sync=0.0), trained_at=self.version, updates_at=updates_at)
        return m, groups

    def _replica_work(self, samples: int, real0: int, computed0: int) -> list[RankWork]:
        """What the first rank of each data-parallel replica did this period (a collective: all ranks)."""
        work = torch.tensor([float(samples), float(self.policy.tokens_real - real0),
                             float(self.policy.tokens_computed - computed0)])
        per_rank = [torch.zeros(3) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, work)
        return [RankWork(*(v.item() for v in per_rank[r])) for r in self.placement.replica_leaders(self.layout)]

    # -- refills for dynamic sampling (the same on every rank) --------------------------------------------------
    def _more_prompts(self) -> list[Task]:
        episode, batch = self.data.next_batch()
        return [Task(f"e{episode}-{ex.index}", ex.messages, ex.answer, ex.image, ex.question) for ex in batch]

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

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, start_step: int, total_steps: int, on_step=None) -> None:
        """The loop: each step, its metrics (with the held-out evaluation when due) logged, then in order the
        agreement on a requested stop, the non-finite guard, `on_step` (the checkpoint) and the end conditions
        (the optimizer-step budget, a stop: watchdog.py's guards)."""
        bar = self.logger.progress(start_step, total_steps, "SPARK", unit="step")
        self.total_steps = total_steps
        self.version = self.engine_version = start_step  # (the engines were given the start weights)
        self.engine_updates = self.policy.optimizer_steps
        for step in range(start_step, total_steps):
            self.watchdog.arm()  # (re-armed each step: the step and its checkpoint must finish in time)
            inject_step_faults(step + 1, self.rank)
            metrics = self.step(step)
            budget_spent = self.budget.spent(self.policy.optimizer_steps)
            if self.evaluation is not None and self.evaluation.due(step + 1, total_steps, last=budget_spent):
                metrics.update(self.evaluation())
            self.logger.log(step + 1, metrics)
            self._show(bar, metrics)
            stopping = self.stop.agree()
            # (after logging: the skipped updates are on record; the error is the same on every rank)
            flags, self.update_flags = self.update_flags, []
            self.nonfinite.record(flags, step + 1)
            if on_step is not None:
                on_step(step + 1, metrics, stopping)
            if stopping:
                self.stop.stop_after(step + 1)
                break
            if budget_spent:
                if self.placement.writes(self.rank):
                    print(f"stopping after step {step + 1}: {self.policy.optimizer_steps} optimizer steps (budget)",
                          flush=True)
                break
        self.watchdog.disarm()
        if bar is not None:
            bar.close()

    def step(self, step: int) -> dict:
        """One RL step: the infer period on the next prompts, their groups recycled into the queue, the reward
        period when the queue holds a batch; returns the step's metrics. (With algorithm.max_staleness=1:
        `overlapped_step`.)"""
        self.version = step
        if self.cfg.algorithm.max_staleness:
            return self.overlapped_step(step)
        t0 = time.perf_counter()
        episode, batch = self.data.next_batch()
        self.queue.start_episode(episode)
        tasks = [Task(f"e{episode}-{ex.index}", ex.messages, ex.answer, ex.image, ex.question) for ex in batch]
        metrics, groups = self.period("infer", tasks, step, more=self._more_prompts)
        self.queue.push(recycle(groups, self.templates, self.recycle_settings, self.rng))
        aux = self.queue.pop_batch()
        if aux is not None:
            drawn = [len(aux)]
            m2, _ = self.period("reward", self._aux_tasks(aux, step), step, more=lambda: self._more_aux(step, drawn))
            metrics.update(m2)
        metrics.update(self._step_metrics(episode, aux is not None, time.perf_counter() - t0))
        return metrics

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
        if self.inflight is None:
            self.inflight = self._submit_round(step)
        rnd, self.inflight = self.inflight, None
        parts = rnd.result(self)
        built = rnd.prompts or [PromptCache(self.prompts, tasks) for _, tasks, _, _ in parts]
        wait_s = time.perf_counter() - t0  # (generation not hidden behind the previous step's training)
        t1 = time.perf_counter()
        if self.engine_version != step:
            self.rollouts.push()
            self.engine_version, self.engine_updates = step, self.policy.optimizer_steps
        sync_s = time.perf_counter() - t1
        sync_bytes = self._sync_bytes("infer")  # (of the last sync: a resumed run's first was made at its start)
        probe = self._sync_probe(parts[0][1], built[0], step)
        scored = []
        for name, tasks, outs, gen_metrics in parts:
            t = time.perf_counter()
            rewards = self._score_outs(tasks, outs)
            scored.append((name, tasks, outs, rewards, gen_metrics, time.perf_counter() - t))
        _, tasks, outs, rewards, _, _ = scored[0]
        self.queue.push(recycle(self.groups(tasks, outs, rewards), self.templates, self.recycle_settings, self.rng))
        if step + 1 < self.total_steps:
            self.inflight = self._submit_round(step + 1)
        metrics = {"policy_version": step, "sync/logprob_drift_max": probe, "time/generation_wait": wait_s,
                   **sync_bytes}
        for (name, tasks, outs, rewards, gen_metrics, score_s), prompts in zip(scored, built):
            m, _ = self.update(name, tasks, prompts, outs, rewards, gen_metrics, step,
                               rollout_s=wait_s if name == "infer" else 0.0)
            m[f"time/{name}_reward"] += score_s
            m[f"time/{name}_sync"] = sync_s if name == "infer" else 0.0
            metrics.update(m)
        metrics.update(self._step_metrics(rnd.episode, len(parts) > 1, time.perf_counter() - t0))
        return metrics

    def _submit_round(self, step: int) -> "Round":
        """Draw step `step`'s prompts (the next infer batch; the queue's next reward batch, when it holds one) and
        hand them to the engines, which generate them with the weights they hold now."""
        # the reward batch first: the queue holds the groups recycled up to this step, which a new episode's
        # start would clear (a synchronous step also trains on them before its successor starts the next episode)
        aux = self.queue.pop_batch()
        episode, batch = self.data.next_batch()
        self.queue.start_episode(episode)
        parts = [("infer", [Task(f"e{episode}-{ex.index}", ex.messages, ex.answer, ex.image, ex.question)
                            for ex in batch])]
        if aux is not None:
            parts.append(("reward", self._aux_tasks(aux, step)))
        built = [PromptCache(self.prompts, tasks) for _, tasks in parts]
        ticket = self.request([(name, tasks, b, 0) for (name, tasks), b in zip(parts, built)], step)
        return Round(step, self.engine_version, episode, parts, ticket, prompts=built)

    def _sync_probe(self, tasks: list[Task], cache: "PromptCache", step: int, prompts: int = 2, tokens: int = 8
                    ) -> float:
        """The weight sync checked on the weights the engines now hold (the trainer's): a few greedy samples, their
        log-probs from the engines against the trainer's (max |difference| over tokens; fp32: ~1e-6)."""
        built = cache.select(tasks, list(range(min(prompts, len(tasks)))))
        tasks = tasks[:prompts]
        greedy = dict(n=1, temperature=0.0, max_new_tokens=min(tokens, self.rollouts.sampling.max_new_tokens))
        ticket = self.request([("probe", tasks, built, 0)], step, overrides=greedy)
        outs, _ = self.receive([("probe", len(tasks))], ticket, self.version)[0]
        rollouts = [Rollout(built[i]["input_ids"], s.token_ids, f"probe:{i}", built[i]["pixel_values"],
                            built[i]["image_grid_thw"]) for i, g in enumerate(outs) for s in g if s.token_ids]
        drift = 0.0
        for r, s, lp in zip(rollouts, (s for g in outs for s in g if s.token_ids),
                            self.policy.token_logprobs(rollouts) if rollouts else []):
            drift = max(drift, (lp - torch.tensor(s.logprobs)).abs().max().item())
        return drift

    # -- the loop's parts ----------------------------------------------------------------------------------------
    @staticmethod
    def _show(bar, metrics: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['infer/reward_mean']:.2f}",
                            judge=f"{metrics.get('reward/judge_accuracy', float('nan')):.2f}")

    def _step_metrics(self, episode: int, reward_period: bool, step_s: float) -> dict:
        """The step's own metrics: per-rank step times (a collective) and the memory peak on GPU."""
        per_rank = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, torch.tensor([step_s]))
        times = [t.item() for t in per_rank]
        m = {"episode": episode, "queue": len(self.queue), "reward_period": int(reward_period),
             "time/step": step_s, "time/step_rank_min": min(times), "time/step_rank_max": max(times),
             "time/slowest_rank": times.index(max(times)), "optimizer_steps": self.policy.optimizer_steps}
        if torch.cuda.is_available():  # the sweep's memory figure (the planner's comparison)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30])
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            m["memory/max_allocated_gib"] = peak.item()
        return m
