"""The kinds of task a SPARK run trains on: the data's own problems and the four kinds recycled from their rollouts.

A `StrEnum`, so a kind is its name wherever text meets it (data files, metric keys, template families, checkpoints)
and compares equal to it; code names kinds only through this enum. A leaf module: it imports nothing of ours.
"""
from __future__ import annotations

from enum import StrEnum


class TaskKind(StrEnum):
    TASK = "task"                      # a problem from the training data, rewarded against its answer
    POINTWISE = "pointwise"            # is this answer to the problem right? (Yes / No)
    PAIRWISE = "pairwise"              # which of two answers is right? (A / B)
    REFLECTION_COT = "reflection_cot"  # a wrong reasoning to correct: the label is the problem's answer
    REFLECTION_ANS = "reflection_ans"  # a wrong final answer to correct: the label is the problem's answer

    @property
    def is_judge(self) -> bool:
        return self in JUDGE_KINDS

    @property
    def is_reflection(self) -> bool:
        return self in REFLECTION_KINDS


JUDGE_KINDS = (TaskKind.POINTWISE, TaskKind.PAIRWISE)
REFLECTION_KINDS = (TaskKind.REFLECTION_COT, TaskKind.REFLECTION_ANS)
RECYCLED_KINDS = JUDGE_KINDS + REFLECTION_KINDS  # (the template families, in this order)
VERDICTS = {TaskKind.POINTWISE: ("Yes", "No"), TaskKind.PAIRWISE: ("A", "B")}  # (the judge kinds' labels)
