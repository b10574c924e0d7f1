"""How good is the model as a judge: metrics that see learning before the greedy verdict flips (pure functions).

A greedy judge scored on balanced labels reads exactly 0.5 whenever its verdict ignores the input, whatever it has
learned short of flipping. So each judge item also gets k verdicts sampled at the training temperature, and the
fraction of them that say "the proposed / first answer is right" (`Yes` or `A`) is the item's score:

- **AUROC** of that score against the truth: does the judge rank items whose answer is right above items whose
  answer is wrong? 0.5 for any verdict that ignores the input (a constant one included), 1.0 for a perfect ranking,
  with ties counted half (Mann-Whitney).
- **accuracy** (greedy), **per-label accuracy** (a judge that always says Yes scores 1.0 on Yes items and 0.0 on No
  items: both are shown, and their minimum), **vote accuracy** (more than half of the k votes name the label).
- **solve-to-judge gap**: of the items whose question the model answers right (greedy), the share it misjudges. A
  judge that solves, then compares, misjudges few of them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_spark.reward import boxed_answer, normalize

VERDICTS = ("yes", "no", "a", "b")
POSITIVE = {"yesno": "yes", "ab": "a"}   # the verdict that says the proposed (pointwise) or first (pairwise) answer


def verdict_of(text: str) -> Optional[str]:
    """The response's verdict, lower case (`yes`, `no`, `a`, `b`), `other` for another boxed answer, None without
    one (no box, or boxes holding different answers)."""
    v = boxed_answer(text or "")
    if v is None:
        return None
    v = normalize(v).lower()
    return v if v in VERDICTS else "other"


@dataclass(frozen=True)
class JudgeOutcome:
    """One judge item: its kind (`pointwise` / `pairwise`), its gold verdict, the verdict that means "right" in its
    template (`yes` or `a`), the greedy verdict, the k sampled verdicts, and whether the model solves its question
    (greedy; None when unknown)."""
    kind: str
    label: str
    positive: str
    greedy: Optional[str]
    votes: Sequence[Optional[str]] = field(default_factory=tuple)
    solved: Optional[bool] = None

    @property
    def truth(self) -> bool:
        """Is the proposed (pointwise) or first (pairwise) answer the right one?"""
        return self.label.lower() == self.positive

    @property
    def correct(self) -> bool:
        return self.greedy == self.label.lower()

    @property
    def score(self) -> float:
        """P(the judge says "right"): the share of sampled verdicts that do; the greedy verdict without votes."""
        if self.votes:
            return sum(v == self.positive for v in self.votes) / len(self.votes)
        return float(self.greedy == self.positive)

    @property
    def vote_correct(self) -> bool:
        return bool(self.votes) and sum(v == self.label.lower() for v in self.votes) > len(self.votes) / 2


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve of `scores` for the positives in `truth`: the probability that a random positive
    scores above a random negative, ties counting half. None without both classes."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    if not pos or not neg:
        return None
    # rank-sum form: average ranks over ties, O(n log n)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, t in zip(ranks, truth) if t)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def judge_report(outcomes: Sequence[JudgeOutcome]) -> dict:
    """The judge's metrics over `outcomes`, pooled and per kind: {accuracy, accuracy_<label>, min_label_accuracy,
    vote_accuracy, auroc, p_right (mean score), no_verdict, solved_misjudged, items}; None where undefined."""
    out = _report(outcomes)
    for kind in sorted({o.kind for o in outcomes}):
        out.update({f"{kind}_{k}": v for k, v in _report([o for o in outcomes if o.kind == kind]).items()})
    return out


def _report(outcomes: Sequence[JudgeOutcome]) -> dict:
    by_label: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        by_label[o.label.lower()].append(float(o.correct))
    per_label = {lab: sum(v) / len(v) for lab, v in sorted(by_label.items())}
    solved = [o for o in outcomes if o.solved]
    voted = [o for o in outcomes if o.votes]
    return {"items": len(outcomes),
            "accuracy": _mean([float(o.correct) for o in outcomes]),
            **{f"accuracy_{lab}": acc for lab, acc in per_label.items()},
            "min_label_accuracy": min(per_label.values()) if per_label else None,
            "vote_accuracy": _mean([float(o.vote_correct) for o in voted]) if voted else None,
            "auroc": auroc([o.score for o in outcomes], [o.truth for o in outcomes]),
            "p_right": _mean([o.score for o in outcomes]),
            "no_verdict": _mean([float(o.greedy is None) for o in outcomes]),
            "solved_misjudged": _mean([float(not o.correct) for o in solved]) if solved else None}
