"""SPARK's recycling: one batch of rollouts and their 0/1 rewards -> new verifiable tasks for the same model.

Per prompt group (as the SPARK release does, arXiv 2509.22624):
- all correct -> pointwise judgement of a correct answer (label Yes / A);
- all wrong   -> pointwise judgement of a wrong answer (label No / B);
- mixed       -> pointwise (probability `pointwise_prob_mixed`, the judged answer's class drawn uniformly) or
                 pairwise with one correct and one wrong answer, the correct one in a random slot (label A / B);
- at least one wrong -> a reflection task whose label is the ground truth: the first `cot_fraction` of the batch's
  groups carry a wrong response's full reasoning, the rest only its boxed answer.
Judge prompts carry the extracted answers (not the reasoning), as SPARK does. At most `judge_cap` judge and
`reflection_cap` reflection tasks are kept per batch (random subset). With `balance_pointwise` (not SPARK; off by
default) the pointwise tasks are first cut to equal numbers of Yes and No labels. Groups are keyed by prompt id,
never by position in a flat batch. Deterministic for a given `random.Random`.
"""
from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Hashable, Optional, Sequence

from megatron_spark.kinds import TaskKind
from megatron_spark.reward import boxed_answer
from megatron_spark.templates import Template, TemplateBank, strip_suffix



@dataclass
class Group:
    """One prompt and its n rollouts."""
    prompt_id: Hashable
    question: str
    answer: str
    responses: list[str]
    rewards: list[float]
    image: Optional[str] = None


@dataclass
class AuxTask:
    kind: TaskKind               # one of kinds.RECYCLED_KINDS
    prompt: str
    answer: str                   # the label the verifier checks the new rollouts against
    image: Optional[str]
    source_prompt_id: Hashable
    source_correct: Optional[bool] = None  # pointwise: was the judged answer correct (for judge accuracy)

    def __post_init__(self):
        self.kind = TaskKind(self.kind)

    def to_record(self, max_pixels: int = 1048576) -> dict:
        """The Spark training-data format: a JSON-stringified chat `message` and the `answer`."""
        return {"message": json.dumps(task_messages(self, max_pixels)), "answer": self.answer}


def task_messages(task: AuxTask, max_pixels: int = 1048576) -> list[dict]:
    """The chat of a recycled task as training rolls it out (one user turn: its image, then its text); the held-out
    evaluation builds its judge prompts with this too, so the two are the same tokens."""
    content: list[dict] = []
    if task.image is not None:
        content.append({"type": "image", "image": task.image, "max_pixels": max_pixels})
    content.append({"type": "text", "text": task.prompt})
    return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class RecycleSettings:
    """What recycling reads of the `algorithm.recycle` section; its defaults are the section's (`of`)."""
    pointwise_prob_mixed: float
    judge_cap: int
    reflection_cap: int
    cot_fraction: float
    balance_pointwise: bool
    max_pixels: int                  # attached to recycled image prompts
    samples_per_task: Optional[int]  # the reward period's group size (None: the rollout's n)
    counterfactual_verdicts: bool    # one-verdict judge groups get one sample of the other (counterfactual.py)

    @classmethod
    def from_config(cls, rc) -> "RecycleSettings":
        return cls(rc.pointwise_prob_mixed, rc.judge_cap, rc.reflection_cap, rc.cot_fraction, rc.balance_pointwise,
                   rc.max_pixels, rc.samples_per_task, rc.counterfactual_verdicts)

    @classmethod
    def of(cls, **overrides) -> "RecycleSettings":
        """The section's defaults with `overrides` (tests, tools)."""
        from megatron_spark.config import RecycleConfig

        return replace(cls.from_config(RecycleConfig()), **overrides)


def pointwise_task(t: Template, q: str, ans: str, correct: bool, image: Optional[str], source: Hashable) -> AuxTask:
    """Judge one answer `ans` to question `q` with template `t`: label Yes/No (or A = correct / B = wrong)."""
    label = ("Yes" if correct else "No") if t.label_type == "yesno" else ("A" if correct else "B")
    return AuxTask(TaskKind.POINTWISE, t.render(question=q, answer=ans), label, image, source, correct)


def pairwise_task(t: Template, q: str, good: str, bad: str, good_first: bool, image: Optional[str],
                  source: Hashable) -> AuxTask:
    """Pick the right one of two answers, the right one in slot A when `good_first`: label A or B."""
    a, b = (good, bad) if good_first else (bad, good)
    return AuxTask(TaskKind.PAIRWISE, t.render(question=q, answer_a=a, answer_b=b), "A" if good_first else "B", image,
                   source)


def _pointwise(g: Group, q: str, ans: str, correct: bool, bank: TemplateBank, rng: random.Random) -> AuxTask:
    return pointwise_task(bank.sample(TaskKind.POINTWISE, rng), q, ans, correct, g.image, g.prompt_id)


def _pairwise(g: Group, q: str, good: str, bad: str, bank: TemplateBank, rng: random.Random) -> AuxTask:
    t = bank.sample(TaskKind.PAIRWISE, rng)
    return pairwise_task(t, q, good, bad, rng.random() < 0.5, g.image, g.prompt_id)


def judge_task(g: Group, bank: TemplateBank, s: RecycleSettings, rng: random.Random) -> Optional[AuxTask]:
    q = strip_suffix(g.question)
    answers = [boxed_answer(r) for r in g.responses]  # (a hedge over several boxes has none: never quoted)
    ok = [r >= 0.5 for r in g.rewards]
    good = [a for a, c in zip(answers, ok) if c and a is not None]
    bad = [a for a, c in zip(answers, ok) if not c and a is not None]
    if all(ok):
        return _pointwise(g, q, good[0], True, bank, rng) if good else None
    if not any(ok):
        return _pointwise(g, q, rng.choice(bad), False, bank, rng) if bad else None
    if rng.random() < s.pointwise_prob_mixed:
        correct = rng.random() < 0.5
        pool = good if correct else bad
        if not pool:  # that class has no boxed answer to show; judge the other class instead
            correct, pool = not correct, (bad if correct else good)
        return _pointwise(g, q, rng.choice(pool), correct, bank, rng) if pool else None
    if not good or not bad:
        return None
    return _pairwise(g, q, rng.choice(good), rng.choice(bad), bank, rng)


def reflection_task(g: Group, use_cot: bool, bank: TemplateBank, rng: random.Random) -> Optional[AuxTask]:
    wrong = [i for i, r in enumerate(g.rewards) if r < 0.5]
    if not wrong:
        return None
    q = strip_suffix(g.question)
    if use_cot:
        i = rng.choice(wrong)
        t = bank.sample(TaskKind.REFLECTION_COT, rng)
        return AuxTask(TaskKind.REFLECTION_COT, t.render(question=q, cot=g.responses[i].strip()), g.answer, g.image,
                       g.prompt_id)
    boxed = [a for a in (boxed_answer(g.responses[i]) for i in wrong) if a is not None]
    if not boxed:
        return None
    t = bank.sample(TaskKind.REFLECTION_ANS, rng)
    return AuxTask(TaskKind.REFLECTION_ANS, t.render(question=q, answer=rng.choice(boxed)), g.answer, g.image,
                   g.prompt_id)


def balance_pointwise(judge: Sequence[AuxTask], rng: random.Random) -> list[AuxTask]:
    """As many pointwise tasks of a correct answer as of a wrong one: the majority class is subsampled (a random
    subset, original order kept); pairwise tasks are kept as they are (their A/B slot is already drawn fairly)."""
    pos = [i for i, t in enumerate(judge) if t.kind == TaskKind.POINTWISE and t.source_correct]
    neg = [i for i, t in enumerate(judge) if t.kind == TaskKind.POINTWISE and not t.source_correct]
    n = min(len(pos), len(neg))
    keep = set(rng.sample(pos, n)) | set(rng.sample(neg, n))
    return [t for i, t in enumerate(judge) if t.kind != TaskKind.POINTWISE or i in keep]


def recycle(groups: Sequence[Group], bank: TemplateBank, s: RecycleSettings, rng: random.Random) -> list[AuxTask]:
    """Judge tasks then reflection tasks built from one infer-period batch (see the module docstring)."""
    judge = [t for g in groups if (t := judge_task(g, bank, s, rng)) is not None]
    if s.balance_pointwise:
        judge = balance_pointwise(judge, rng)
    n_cot = int(round(s.cot_fraction * len(groups)))
    refl = [t for i, g in enumerate(groups) if (t := reflection_task(g, i < n_cot, bank, rng)) is not None]
    if len(judge) > s.judge_cap:
        judge = rng.sample(judge, s.judge_cap)
    if len(refl) > s.reflection_cap:
        refl = rng.sample(refl, s.reflection_cap)
    return judge + refl


@dataclass
class AuxQueue:
    """FIFO of recycled tasks; releases a reward-period batch when it holds `batch_size`. Reset every episode, as
    SPARK does, so tasks from one pass over the data never leak into the next."""
    batch_size: int
    episode: Optional[int] = None
    items: deque = field(default_factory=deque)

    @classmethod
    def from_config(cls, rc) -> "AuxQueue":
        """The `algorithm.recycle` section's batch size."""
        return cls(rc.reward_batch_size)

    def start_episode(self, episode: int) -> None:
        if episode != self.episode:
            self.items.clear()
            self.episode = episode

    def push(self, tasks: Sequence[AuxTask]) -> None:
        if self.episode is None:
            raise RuntimeError("AuxQueue.push before start_episode")
        self.items.extend(tasks)

    def pop_batch(self) -> Optional[list[AuxTask]]:
        if len(self.items) < self.batch_size:
            return None
        return [self.items.popleft() for _ in range(self.batch_size)]

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        # (kinds by name: a checkpoint holds plain data, which torch loads with weights_only)
        return {"batch_size": self.batch_size, "episode": self.episode,
                "items": [asdict(t) | {"kind": t.kind.value} for t in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.batch_size, self.episode = state["batch_size"], state["episode"]
        self.items = deque(AuxTask(**t) for t in state["items"])
