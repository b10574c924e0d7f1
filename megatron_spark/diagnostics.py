"""What the reward period teaches the judge, as metrics any run logs (pure function, unit-tested).

For the judge tasks of a period: how balanced their labels are, what the model answers (verdict distribution,
including no verdict at all), the reward per label (a judge that always says Yes scores 1 on Yes tasks and 0 on
No tasks), the share of judge vs reflection tasks, their prompt lengths, and the fraction of judge groups whose
samples disagree: GRPO's advantage, and so the judge's gradient, is zero for a group whose rewards are all equal.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional, Sequence

from megatron_spark.kinds import JUDGE_KINDS, REFLECTION_KINDS
from megatron_spark.reward import boxed_answer, extract_boxed, normalize

JUDGE, REFLECTION = JUDGE_KINDS, REFLECTION_KINDS


def _verdict(text: str) -> str:
    """yes/no/a/b, "other" (another boxed answer), "hedge" (boxes holding different answers: scored 0) or
    "none" (no box)."""
    if extract_boxed(text or "") is None:
        return "none"
    v = boxed_answer(text or "")
    if v is None:
        return "hedge"
    v = normalize(v).lower()
    return v if v in ("yes", "no", "a", "b") else "other"


def judge_diagnostics(kinds: Sequence[str], labels: Sequence[str], prompt_lens: Sequence[int],
                      responses: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                      prefix: str = "reward") -> dict[str, float]:
    """One entry per task: its kind, its label (the gold answer), its prompt length in tokens, its sampled
    responses and their 0/1 rewards. Returns `{prefix}/diag/...` metrics."""
    m: dict[str, float] = {}
    n = len(kinds)
    if not n:
        return m
    judge = [i for i, k in enumerate(kinds) if k in JUDGE]
    refl = [i for i, k in enumerate(kinds) if k in REFLECTION]
    p = f"{prefix}/diag/"
    m[p + "judge_share"] = len(judge) / n
    m[p + "reflection_share"] = len(refl) / n
    for name, idx in (("judge", judge), ("reflection", refl)):
        if idx:
            m[p + f"{name}_prompt_len"] = sum(prompt_lens[i] for i in idx) / len(idx)
    if not judge:
        return m
    label_counts = Counter(normalize(labels[i]).lower() for i in judge)
    for lab in ("yes", "no", "a", "b"):
        m[p + f"label_{lab}"] = label_counts.get(lab, 0) / len(judge)
    verdicts = Counter(_verdict(r) for i in judge for r in responses[i])
    total = sum(verdicts.values()) or 1
    for v in ("yes", "no", "a", "b", "other", "hedge", "none"):
        m[p + f"verdict_{v}"] = verdicts.get(v, 0) / total
    by_label: dict[str, list[float]] = defaultdict(list)
    for i in judge:
        by_label[normalize(labels[i]).lower()].extend(rewards[i])
    for lab, rs in by_label.items():
        m[p + f"reward_label_{lab}"] = sum(rs) / len(rs)
    mixed = [i for i in judge if len(set(rewards[i])) > 1]
    m[p + "judge_groups_with_gradient"] = len(mixed) / len(judge)
    return m


def balanced_accuracy(by_label: dict[str, float]) -> Optional[float]:
    """Mean of the per-label accuracies (chance is 0.5 whatever the label mix)."""
    vals = list(by_label.values())
    return sum(vals) / len(vals) if vals else None
