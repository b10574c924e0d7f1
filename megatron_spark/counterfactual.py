"""Counterfactual verdicts: a judge group that gave one verdict only gets one sample of the other.

Not in SPARK (`algorithm.recycle.counterfactual_verdicts`, off for paper runs). A judge group whose samples all give
the same verdict has no reward spread, so GRPO gives it no gradient. Once a judge says "No" to everything it never
samples "Yes" again and can never learn that some answers are right: the collapse docs/benchmarks.md measures on the
main job, where the verdict follows the early majority label (or, with balanced labels, drifts to one side) within
twenty steps and stays there. With the option on, in such a group the last sample that gives a verdict has it
swapped for the other option (the text rewritten and re-tokenized, the reward re-scored by the verifier): the group
then holds both verdicts, the label rewards one of them, and the update pushes toward the label on that very input.
No label is added: the label is the one recycling verified from the policy's own rollouts, as for every judge
reward; the swapped sample is off-policy: it has no engine log-probs (its pi_old comes from the trainer's recompute
pass, and truncated importance sampling weighs it 1), which is why validation refuses the option with
`algorithm.old_logprobs=engine`. The period's judge diagnostics count the rewritten samples; what the policy itself
sampled is logged beside them (`sampled_judge_figures`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_spark.kinds import JUDGE_KINDS, TaskKind
from megatron_spark.reward import boxed_answer, normalize

VERDICT_PAIRS = (("Yes", "No"), ("A", "B"))


def verdict_options(label: str) -> Optional[tuple[str, str]]:
    """The two verdicts a judge task with this label chooses between (Yes/No or A/B); None for any other label."""
    for pair in VERDICT_PAIRS:
        if label.strip().lower() in (p.lower() for p in pair):
            return pair
    return None


def other_verdict(verdict: Optional[str], options: tuple[str, str]) -> Optional[str]:
    """The option that is not `verdict` (compared case-insensitively); None when `verdict` is neither."""
    if verdict is None:
        return None
    low = normalize(verdict).strip("(). ").lower()  # (as the verifier reads it: \text{No}, (B), No.)
    if low == options[0].lower():
        return options[1]
    if low == options[1].lower():
        return options[0]
    return None


def swap_verdict(text: str, verdict: str, other: str, accept_box_alias: bool = True) -> Optional[str]:
    """`text` with every box holding `verdict` made to hold `other`; None when the result does not read as exactly
    that verdict (so a swap can never create a hedge or lose the box)."""
    opener = r"\\boxed\s*\{|\\box\s*\{" if accept_box_alias else r"\\boxed\s*\{"
    pattern = re.compile(rf"({opener})\s*{re.escape(verdict)}\s*\}}", re.IGNORECASE)
    swapped = pattern.sub(lambda m: m.group(1) + other + "}", text)
    return swapped if boxed_answer(swapped, accept_box_alias) == other else None


@dataclass(frozen=True)
class Swap:
    group: int      # the task's index in the period
    sample: int     # the sample's index in its group
    text: str       # the sample's text with the other verdict


def counterfactual_swaps(kinds: Sequence[TaskKind], labels: Sequence[str], texts: Sequence[Sequence[str]],
                         rewards: Sequence[float], accept_box_alias: bool = True,
                         truncated: Optional[Sequence[Sequence[bool]]] = None) -> list[Swap]:
    """One swap per judge group without reward spread whose samples give one verdict: its last sample with that
    verdict gets the other. `texts` are the groups' sample texts, `rewards` the flat rewards in the same order,
    `truncated` which samples were cut at the length limit (never swapped: algorithm.mask_truncated would drop them,
    and a rewritten one could exceed the limit). Groups with spread, non-judge tasks and groups where no sample
    gives a verdict are left alone."""
    swaps, k = [], 0
    for g, (kind, label, group) in enumerate(zip(kinds, labels, texts)):
        rs = rewards[k:k + len(group)]
        k += len(group)
        options = verdict_options(label)
        if kind not in JUDGE_KINDS or options is None or len(group) < 2 or max(rs) != min(rs):
            continue
        verdicts = [boxed_answer(t, accept_box_alias) for t in group]
        sides = [other_verdict(v, options) for v in verdicts]  # (the verdict each sample did NOT give)
        if len({s for s in sides if s is not None}) != 1:  # no verdict at all (nothing to contrast), or both
            continue
        cut = truncated[g] if truncated is not None else [False] * len(group)
        usable = [j for j, s in enumerate(sides) if s is not None and not cut[j]]
        if not usable:
            continue
        i = usable[-1]
        new = swap_verdict(group[i], verdicts[i], sides[i], accept_box_alias)
        if new is not None:
            swaps.append(Swap(g, i, new))
    return swaps


def sampled_judge_figures(kinds: Sequence[TaskKind], labels: Sequence[str], texts: Sequence[Sequence[str]],
                          rewards: Sequence[float], accept_box_alias: bool = True) -> dict[str, float]:
    """What the policy itself sampled in a reward period, before any swap (the period's judge diagnostics count
    the rewritten samples): the share of judge groups with reward spread and the share of judge verdicts that
    are the first option (Yes or A); each only when there is something to count."""
    groups = spread = first = given = k = 0
    for kind, label, group in zip(kinds, labels, texts):
        rs = rewards[k:k + len(group)]
        k += len(group)
        options = verdict_options(label)
        if kind not in JUDGE_KINDS or options is None:
            continue
        groups += 1
        spread += max(rs) != min(rs)
        for t in group:
            other = other_verdict(boxed_answer(t, accept_box_alias), options)
            given += other is not None
            first += other == options[1]
    out = {"judge_groups_with_gradient_sampled": spread / groups} if groups else {}  # (no judge task: no figure)
    if given:
        out["verdict_first_option_sampled"] = first / given
    return out
