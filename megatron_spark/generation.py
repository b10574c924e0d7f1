"""The generation half of a period: prompts -> the engines' samples -> the verifier's rewards (-> refills, with
dynamic sampling). Every rank ends with every sample and reward, in prompt order.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist

from megatron_spark.batching import assemble, dynamic_keep, group_spread
from megatron_spark.counterfactual import counterfactual_swaps, sampled_judge_figures
from megatron_spark.placement import sampling_seed
from megatron_spark.rollout.engine import RolloutRequest
from megatron_spark.rollout.protocols import GenerationPart
from megatron_spark.samples import PromptCache, Scored, Task

Part = tuple[str, list[Task], PromptCache, int]  # (period name, tasks, their prompts, refill round)


class Sampler:
    def __init__(self, cfg, rollouts, prompts, rewards, reward_rank: int, reward_n: Optional[int],
                 counterfactual: bool = False):
        """`rollouts`: the stack's (colocated or remote engines); `rewards`: the reward pool on `reward_rank`;
        `reward_n`: the reward period's group size (recycling's `samples_per_task`; None: the rollout's n);
        `counterfactual`: recycling's `counterfactual_verdicts` (`scored_rewards`)."""
        self.rollouts, self.prompts, self.rewards, self.reward_rank = rollouts, prompts, rewards, reward_rank
        self.seed, self.alg, self.reward_n = cfg.training.seed, cfg.algorithm, reward_n
        self.counterfactual = counterfactual
        # what samples generated now are stamped with: the policy version (the step) and the optimizer steps of
        # the weights the engines hold
        self.version = self.updates = 0

    def request(self, parts: list[Part], step: int, overrides: Optional[dict] = None) -> int:
        """Ask the engines for samples of each part: each engine generates only its share of each part's prompts
        (a prompt's n samples stay on one engine). Returns a ticket for `receive`."""
        def part(name: str, tasks: list[Task], built: PromptCache, rnd: int) -> GenerationPart:
            sampling = {"n": self.reward_n} if name == "reward" and self.reward_n else {}
            return GenerationPart(len(tasks), lambda i: RolloutRequest(built[i].prompt, built[i].images),
                                  lambda engine: sampling_seed(self.seed, step, name, engine, rnd),
                                  {**sampling, **(overrides or {})})
        return self.rollouts.submit([part(*p) for p in parts])

    def receive(self, names: list[tuple[str, int]], ticket: int, version: int) -> list[tuple[list, dict]]:
        """The samples of each (period, number of prompts) of request `ticket` with the generation's metrics, each
        sample stamped with the policy `version` that generated it and the optimizer steps of the engines' weights."""
        out = []
        for (name, n), works in zip(names, self.rollouts.collect(ticket)):
            outs, metrics = assemble(name, n, works)
            for s in (s for g in outs for s in g):
                s.version, s.updates = version, self.updates
            out.append((outs, metrics))
        return out

    def generate(self, name: str, tasks: list[Task], built: PromptCache, step: int, round: int = 0
                 ) -> tuple[list, dict]:
        """Generate now, at the weights the engines hold."""
        return self.receive([(name, len(tasks))], self.request([(name, tasks, built, round)], step),
                            self.version)[0]

    def score(self, tasks: list[Task], outs: list) -> list[float]:
        """The verifier's reward of every sample, computed once (one process pool, on the reward rank) and
        broadcast to every rank."""
        box = [None]
        if dist.get_rank() == self.reward_rank:
            box = [self.rewards.score([s.text for g in outs for s in g],
                                      [t.answer for t, g in zip(tasks, outs) for _ in g])]
        dist.broadcast_object_list(box, src=self.reward_rank)
        return box[0]

    def scored_rewards(self, name: str, tasks: list[Task], outs: list, metrics: dict) -> list[float]:
        """`score`, and in the reward period with algorithm.recycle.counterfactual_verdicts, one sample of each judge
        group that gave a single verdict rewritten to the other verdict and re-scored (`counterfactual.py`; every
        rank rewrites alike, all hold all rewards). In `metrics`: {name}/counterfactual_groups, and what the policy
        sampled before the swaps (the period's judge diagnostics count the rewritten samples)."""
        rewards = self.score(tasks, outs)
        if name != "reward" or not self.counterfactual:
            return rewards
        kinds, labels, texts = [t.kind for t in tasks], [t.answer for t in tasks], [[s.text for s in g] for g in outs]
        swaps = counterfactual_swaps(kinds, labels, texts, rewards, self.alg.accept_box_alias,
                                     [[s.finish_reason == "length" for s in g] for g in outs])
        metrics[f"{name}/counterfactual_groups"] = float(len(swaps))
        metrics.update({f"{name}/{k}": v for k, v in
                        sampled_judge_figures(kinds, labels, texts, rewards, self.alg.accept_box_alias).items()})
        if not swaps:
            return rewards
        tok = self.prompts.tokenizer
        for sw in swaps:
            s = outs[sw.group][sw.sample]
            # the stop token (EOS) is in the ids but not in the text: keep it
            tail = s.token_ids[-1:] if s.token_ids and tok.decode(s.token_ids[-1:], skip_special_tokens=True) == "" \
                else []
            s.text, s.logprobs = sw.text, None  # (no engine log-probs for a token the engine did not sample)
            s.token_ids = tok(sw.text, add_special_tokens=False)["input_ids"] + tail
        new = self.score([tasks[sw.group] for sw in swaps], [[outs[sw.group][sw.sample]] for sw in swaps])
        starts = [0]
        for g in outs:
            starts.append(starts[-1] + len(g))
        rewards = list(rewards)
        for sw, r in zip(swaps, new):
            rewards[starts[sw.group] + sw.sample] = r
        return rewards

    def sample(self, name: str, tasks: list[Task], step: int,
               more: Optional[Callable[[], Optional[list[Task]]]] = None) -> Scored:
        """generate -> score. With algorithm.dynamic_sampling, groups whose rewards are all equal are discarded and
        `more()` (the next prompts, or None when there are none) is generated and scored too, until the period holds
        as many groups with reward spread as it started with or `dynamic_sampling_rounds` rounds are spent
        (`batching.dynamic_keep`). Every rank decides alike (all hold all rewards)."""
        built = PromptCache(self.prompts, tasks)
        outs, metrics = self.generate(name, tasks, built, step)
        rewards = self.scored_rewards(name, tasks, outs, metrics)
        if not self.alg.dynamic_sampling:
            return Scored(tasks, built, outs, rewards, metrics)
        target, rounds = len(tasks), 1
        first_mean, first_spread = sum(rewards) / max(1, len(rewards)), sum(group_spread(outs, rewards))
        while rounds < self.alg.dynamic_sampling_rounds and sum(group_spread(outs, rewards)) < target:
            extra = more() if more is not None else None
            if not extra:
                break
            extra_built = PromptCache(self.prompts, extra)
            extra_outs, m = self.generate(name, extra, extra_built, step, round=rounds)
            rewards = rewards + self.scored_rewards(name, extra, extra_outs, m)
            for k, v in m.items():  # samples and times add up over the rounds (per engine: each round's shares
                if not k.endswith("_sampled"):  # are fixed by the placement, so min and max add up as well;
                    metrics[k] += v             # the shares of what was sampled are the first round's)
            built.extend(extra_built)
            tasks, outs, rounds = tasks + list(extra), outs + extra_outs, rounds + 1
        spread = group_spread(outs, rewards)
        keep = dynamic_keep(spread, target)
        with_spread = sum(spread[i] for i in keep)
        metrics.update({f"{name}/sampling_rounds": rounds, f"{name}/groups_generated": len(tasks),
                        f"{name}/groups_kept": with_spread,
                        f"{name}/groups_filled_without_spread": len(keep) - with_spread,
                        f"{name}/groups_discarded": len(tasks) - len(keep),
                        f"{name}/groups_target": target, f"{name}/reward_mean_first_round": first_mean,
                        f"{name}/groups_with_spread_first_round": first_spread})
        kept = set(keep)
        flat = [i for i, g in enumerate(outs) for _ in g]
        kept_rewards = [r for r, i in zip(rewards, flat) if i in kept]
        return Scored([tasks[i] for i in keep], built.select(tasks, keep), [outs[i] for i in keep], kept_rewards,
                      metrics)
