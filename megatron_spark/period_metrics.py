"""What one RL period logs, assembled from what the period produced: a pure function, so `SparkTrainer.period`
reads as the steps it takes and the metrics can be unit-tested without a model.

Keys are `{period}/...` (period: "infer" or "reward") and `time/{period}_{phase}`; the plot (metrics.panels) stacks
the phases, so none of them includes another (the train phase excludes the log-prob pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_spark.kinds import JUDGE_KINDS, REFLECTION_KINDS


@dataclass(frozen=True)
class RankWork:
    """What one rank did in the period: samples it computed log-probs for, real and computed tokens."""
    samples: float
    tokens_real: float
    tokens_computed: float


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds per phase of one period (each excludes the others)."""
    rollout: float
    reward: float
    logprobs: float
    train: float
    sync: float


def period_metrics(name: str, kinds: Sequence[str], answers: Sequence[str], outs: Sequence[Sequence],
                   rewards: Sequence[float], shaped: Sequence[float], drift: float, prompt_mismatches: int,
                   train_metrics: Sequence[dict], replica_work: Sequence[RankWork], gen_metrics: dict,
                   times: PhaseTimes, trained_at: Optional[int] = None, updates_at: Optional[int] = None) -> dict:
    """`kinds` / `answers`: per task; `outs`: per task, its samples (token_ids, prompt_token_ids, finish_reason,
    text); `rewards` / `shaped`: per sample, in task order (`shaped is rewards` when no shaping applies);
    `train_metrics`: one dict per global batch (`update_skipped` among them); `replica_work`: the first rank of each
    data-parallel replica. `trained_at`: the policy version the update starts from; with samples stamped with the
    version that generated them, the lag between the two is logged (one-step off-policy: 1)."""
    samples = [s for g in outs for s in g]
    n = len(rewards)
    m = {f"{name}/reward_mean": sum(rewards) / n,
         **({f"{name}/shaped_reward_mean": sum(shaped) / len(shaped)} if shaped is not rewards else {}),
         f"{name}/truncated_fraction": sum(s.finish_reason == "length" for s in samples) / n,
         f"{name}/response_len": sum(len(s.token_ids) for s in samples) / n,
         f"{name}/train_rollout_logprob_drift": drift,
         f"{name}/prompt_token_mismatch": prompt_mismatches,
         f"{name}/optimizer_steps": sum(1 - x["update_skipped"] for x in train_metrics),
         f"{name}/updates_skipped_nonfinite": sum(x["update_skipped"] for x in train_metrics),
         f"{name}/logprob_samples_min": min(w.samples for w in replica_work),
         f"{name}/logprob_samples_max": max(w.samples for w in replica_work),
         f"{name}/real_token_fraction": sum(w.tokens_real for w in replica_work) / max(1.0, sum(
             w.tokens_computed for w in replica_work)),
         f"{name}/tokens": sum(len(s.prompt_token_ids) + len(s.token_ids) for s in samples),
         **gen_metrics}
    # the update's means over the updates applied (a skipped one's loss is not finite); the skips over all
    applied = [x for x in train_metrics if not x["update_skipped"]] or list(train_metrics)
    for key in (train_metrics[0] if train_metrics else {}):
        vals = [x[key] for x in (train_metrics if key == "update_skipped" else applied)
                if isinstance(x[key], (int, float))]
        if vals:
            m[f"{name}/{key}"] = sum(vals) / len(vals)
    by_kind: dict[str, list[float]] = {}
    for kind, r in zip((k for k, g in zip(kinds, outs) for _ in g), rewards):
        by_kind.setdefault(kind, []).append(r)
    judge = [r for k in JUDGE_KINDS for r in by_kind.get(k, [])]
    refl = [r for k in REFLECTION_KINDS for r in by_kind.get(k, [])]
    if judge:
        m[f"{name}/judge_accuracy"] = sum(judge) / len(judge)
    if name == "reward":
        from megatron_spark.diagnostics import judge_diagnostics

        per_task, k = [], 0
        for g in outs:
            per_task.append(([s.text for s in g], rewards[k:k + len(g)], len(g[0].prompt_token_ids)))
            k += len(g)
        m.update(judge_diagnostics(list(kinds), list(answers), [n for _, _, n in per_task],
                                   [r for r, _, _ in per_task], [w for _, w, _ in per_task], prefix=name))
    if refl:
        m[f"{name}/reflection_success"] = sum(refl) / len(refl)
    lags = [trained_at - s.version for s in samples if trained_at is not None and s.version is not None]
    if lags:
        m.update({f"{name}/version_lag_mean": sum(lags) / len(lags), f"{name}/version_lag_min": min(lags),
                  f"{name}/version_lag_max": max(lags)})
    behind = [updates_at - s.updates for s in samples if updates_at is not None and s.updates is not None]
    if behind:
        m.update({f"{name}/updates_behind_mean": sum(behind) / len(behind),
                  f"{name}/updates_behind_max": max(behind)})
    m.update({f"time/{name}_rollout": times.rollout, f"time/{name}_reward": times.reward,
              f"time/{name}_train": times.train, f"time/{name}_logprobs": times.logprobs,
              f"time/{name}_sync": times.sync})
    return m
