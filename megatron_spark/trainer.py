"""The SPARK loop on megatron-core + vLLM. One global step = an infer period on task prompts, recycling of its
rollouts into judge/reflection tasks, and a reward period whenever the FIFO holds a full batch.

    for step in steps:
        episode, batch = data.next_batch()             # task prompts
        groups = period("infer", batch)                # rollouts -> rewards -> advantages -> updates -> sync
        queue.push(recycle(groups))                    # new verifiable tasks from the same rollouts
        if (aux := queue.pop_batch()) is not None:
            period("reward", aux)                      # same GRPO update on the auxiliary tasks
        log(); maybe_checkpoint()
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spark.algorithm import group_advantages
from megatron_spark.config import SparkConfig
from megatron_spark.policy import Rollout, grpo_loss_fn
from megatron_spark.recycle import AuxQueue, AuxTask, Group, RecycleSettings, recycle
from megatron_spark.rollout.engine import RolloutRequest


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


class SparkTrainer:
    def __init__(self, cfg: SparkConfig, components: dict):
        """`components` is built by `megatron_spark.train.build_components` (layout, models, engine, data...)."""
        self.cfg = cfg
        for k, v in components.items():
            setattr(self, k, v)
        self.rank = dist.get_rank()
        self.rng = random.Random(cfg.training.seed)
        self.recycle_settings = RecycleSettings.from_config(cfg.algorithm.recycle)
        self.queue = getattr(self, "queue", None) or AuxQueue(cfg.algorithm.recycle.reward_batch_size)
        self.stop_requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # SLURM preemption: finish the current step, write a checkpoint, exit cleanly (requeue resumes).
        self.stop_requested = True

    # -- pieces ------------------------------------------------------------------------------------------------
    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        """Rewards on rank 0 (one process pool), broadcast to all ranks."""
        box = [self.reward_pool.score(responses, golds) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def period(self, name: str, tasks: list[Task], step: int) -> tuple[dict, list[Group]]:
        ro, alg, tr = self.cfg.rollout, self.cfg.algorithm, self.cfg.training
        t0 = time.perf_counter()
        built = [self.prompts.build(t.messages) for t in tasks]
        outs = self.engine.generate([RolloutRequest(b["prompt"], b["images"]) for b in built],
                                    n=ro.n_samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                                    top_k=ro.top_k, max_new_tokens=ro.max_new_tokens,
                                    seed=tr.seed * 100_003 + step * 2 + (name == "reward"))
        self.engine.sleep()  # GPU: free the KV cache and offload vLLM's weights while Megatron trains (CPU: no-op)
        t1 = time.perf_counter()
        texts = [s.text for group in outs for s in group]
        golds = [t.answer for t, group in zip(tasks, outs) for _ in group]
        rewards = self.score(texts, golds)
        t2 = time.perf_counter()
        # Recycled prompts quote responses: decode them without special tokens, so a sampled <|image_pad|> (or
        # any chat-control token) can never reach a new prompt as markup.
        tok = self.prompts.tokenizer
        groups, k = [], 0
        for t, group in zip(tasks, outs):
            groups.append(Group(t.id, t.question, t.answer,
                                [tok.decode(s.token_ids, skip_special_tokens=True) for s in group],
                                rewards[k:k + len(group)], t.image))
            k += len(group)
        rollouts, k = [], 0
        prompt_mismatch = 0
        for t, b, group in zip(tasks, built, outs):
            for s in group:
                prompt_mismatch += int(s.prompt_token_ids != b["input_ids"])
                rollouts.append(Rollout(b["input_ids"], s.token_ids, f"{name}:{t.id}", b["pixel_values"],
                                        b["image_grid_thw"], rewards[k], rollout_logprobs=s.logprobs, kind=t.kind))
                k += 1
        adv = group_advantages(torch.tensor(rewards), [r.group for r in rollouts], alg.advantage_std)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantage = a
        old = self.policy.token_logprobs(rollouts)
        ref = [None] * len(rollouts)
        if alg.kl_coef > 0:
            self.reference.onload()
            ref = self.reference.token_logprobs(rollouts)
            if tr.offload_reference:
                self.reference.offload()
        drift = 0.0
        for r, o, f in zip(rollouts, old, ref):
            r.old_logprobs, r.ref_logprobs = o, f
            drift = max(drift, (o - torch.tensor(r.rollout_logprobs)).abs().max().item() if len(o) else 0.0)
        self.rng.shuffle(rollouts)
        train_metrics = []
        gbs = tr.global_batch_size
        dp, dp_rank = self.layout.dp, self.layout.coords(self.rank)["dp"]
        for i in range(0, len(rollouts) - gbs + 1, gbs):
            chunk = rollouts[i:i + gbs]
            share = chunk[dp_rank * gbs // dp:(dp_rank + 1) * gbs // dp]
            train_metrics.append(self.policy.train_step(share, grpo_loss_fn(alg)))
        t3 = time.perf_counter()
        self.engine.wake_up()  # weights back in place before the sync writes them
        self.sync.push(self.engine)
        t4 = time.perf_counter()
        m = {f"{name}/reward_mean": sum(rewards) / len(rewards),
             f"{name}/response_len": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
             f"{name}/train_rollout_logprob_drift": drift, f"{name}/prompt_token_mismatch": prompt_mismatch,
             f"{name}/optimizer_steps": len(train_metrics)}
        for key in (train_metrics[0] if train_metrics else {}):
            vals = [x[key] for x in train_metrics if isinstance(x[key], (int, float))]
            if vals:
                m[f"{name}/{key}"] = sum(vals) / len(vals)
        by_kind: dict[str, list[float]] = {}
        for r in rollouts:
            by_kind.setdefault(r.kind, []).append(r.reward)
        judge = by_kind.get("pointwise", []) + by_kind.get("pairwise", [])
        refl = by_kind.get("reflection_cot", []) + by_kind.get("reflection_ans", [])
        if judge:
            m[f"{name}/judge_accuracy"] = sum(judge) / len(judge)
        if refl:
            m[f"{name}/reflection_success"] = sum(refl) / len(refl)
        m.update({f"time/{name}_rollout": t1 - t0, f"time/{name}_reward": t2 - t1,
                  f"time/{name}_train": t3 - t2, f"time/{name}_sync": t4 - t3})
        return m, groups

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, start_step: int, total_steps: int, on_step=None) -> None:
        rc = self.cfg.algorithm.recycle
        bar = None
        if self.rank == 0 and self.cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start_step, desc="SPARK", dynamic_ncols=True)
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            episode, batch = self.data.next_batch()
            self.queue.start_episode(episode)
            tasks = [Task(f"e{episode}-{ex.index}", ex.messages, ex.answer, ex.image, ex.question) for ex in batch]
            metrics, groups = self.period("infer", tasks, step)
            self.queue.push(recycle(groups, self.templates, self.recycle_settings, self.rng))
            aux = self.queue.pop_batch()
            if aux is not None:
                aux_tasks = [Task.from_aux(f"s{step}-{i}", t, rc.max_pixels) for i, t in enumerate(aux)]
                m2, _ = self.period("reward", aux_tasks, step)
                metrics.update(m2)
            metrics.update({"episode": episode, "queue": len(self.queue), "reward_period": int(aux is not None),
                            "time/step": time.perf_counter() - t0, "optimizer_steps": self.policy.optimizer_steps})
            self.logger.log(step + 1, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['infer/reward_mean']:.2f}",
                                judge=f"{metrics.get('reward/judge_accuracy', float('nan')):.2f}")
            # A signal reaches the ranks at slightly different moments: agree on stopping after the same step,
            # or one rank would enter the checkpoint collective while another starts the next step.
            flag = torch.tensor([float(self.stop_requested)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop_requested = bool(flag.item())
            if on_step is not None:
                on_step(step + 1, metrics)
            if self.stop_requested:
                if self.rank == 0:
                    print(f"stopping after step {step + 1} on request (signal)", flush=True)
                    marker = os.environ.get("SPARK_STOP_MARKER")  # slurm/train.sbatch requeues when it exists
                    if marker:
                        Path(marker).write_text(str(step + 1))
                break
        if bar is not None:
            bar.close()
