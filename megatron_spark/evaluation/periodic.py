"""Held-out evaluation inside training, through the trainer's own rollout engines, every `eval.interval` steps
(`HeldOutEval`, the component that owns the `eval` section): greedy task accuracy, and the judge on two judge tasks
per held-out example (pointwise and pairwise, balanced labels) with the metrics of `megatron_spark.judging`
(accuracy per label, AUROC and vote accuracy from `eval.judge_votes` verdicts sampled as training samples, the
solve-to-judge gap). Every prompt is built exactly as training builds it (the same record messages, recycling's
judge-task construction and templates, the same chat template and image bounds).

The items go through the run's rollouts (`rollout/protocols.Rollouts`), as training prompts do: each engine,
colocated or disaggregated, generates only its share, and every training rank gets every text, so every rank logs
the same numbers."""
from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Optional, Sequence


from megatron_spark.data import Example, load_records

from megatron_spark.fixtures.shapes import COLOURS
from megatron_spark.judging import POSITIVE, JudgeOutcome, judge_report, verdict_of
from megatron_spark.kinds import TaskKind
from megatron_spark.recycle import AuxTask, pairwise_task, pointwise_task, task_messages
from megatron_spark.reward import VerifierConfig, score
from megatron_spark.templates import TemplateBank, strip_suffix, with_suffix

if TYPE_CHECKING:
    from megatron_spark.config import EvalConfig
    from megatron_spark.rollout.protocols import Rollouts


def load_held_out(path: str, max_items: int, max_pixels: int) -> list[Example]:
    """A training-format file (Spark records) or a benchmark file in the released format."""
    from megatron_spark.evaluation.items import EvalInputError, MathItem, load_items

    try:
        fmt, items = load_items(path, limit=max_items)
    except EvalInputError:
        fmt = None
    if fmt != "spark":
        examples, _ = load_records(path)
        return examples[:max_items]
    out = []
    for i, it in enumerate(items):
        assert isinstance(it, MathItem)
        content: list[dict] = [{"type": "text", "text": with_suffix(it.problem)}]
        if it.image_path:
            content.insert(0, {"type": "image", "image": it.image_path, "max_pixels": max_pixels})
        out.append(Example(i, [{"role": "user", "content": content}], it.answer, it.image_path,
                           with_suffix(it.problem)))
    return out


def _wrong_answer(ex: Example, rnd: random.Random) -> str:
    """A wrong candidate for a judge item: another option of the shapes task, else a perturbed number/string."""
    options = [str(k) for k in range(1, len(COLOURS) + 1)]
    if ex.answer in options:
        return rnd.choice([o for o in options if o != ex.answer])
    try:
        return str(int(float(ex.answer)) + rnd.choice([-2, -1, 1, 2]))
    except ValueError:
        return ex.answer + "0"


def judge_tasks(examples: Sequence[Example], bank: TemplateBank, seed: int) -> list[AuxTask]:
    """Two judge tasks per example, built as recycling builds them (the same templates, question text, image and
    labels; `recycle.pointwise_task` / `pairwise_task`), with balanced labels: a pointwise task of its right answer
    on even examples and of a wrong one on odd ones, and a pairwise task whose right answer is in slot A for
    examples 0, 1, 4, 5, ... and in slot B for the others. One fixed template per kind (the bank's first yes/no
    pointwise and first pairwise), so evaluations compare."""
    rnd = random.Random(seed)
    fixed = bank.judge_templates()
    out = []
    for i, ex in enumerate(examples):
        q, wrong = strip_suffix(ex.question), _wrong_answer(ex, rnd)
        right = i % 2 == 0
        out.append(pointwise_task(fixed[TaskKind.POINTWISE], q, ex.answer if right else wrong, right, ex.image, i))
        out.append(pairwise_task(fixed[TaskKind.PAIRWISE], q, ex.answer, wrong, (i // 2) % 2 == 0, ex.image, i))
    return out


def _texts(rollouts: "Rollouts", prompts, messages: Sequence[list[dict]], seed: int = 0, **overrides
           ) -> dict[int, list[str]]:
    """{item index: [texts]}: every engine generates its share of `messages` (each rank builds only the prompts its
    engine needs), every rank gets all (a collective of the training ranks)."""
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.rollout.protocols import generate_all

    def request(i: int) -> RolloutRequest:
        b = prompts.build(messages[i])
        return RolloutRequest(b.prompt, b.images)
    outs = generate_all(rollouts, request, len(messages), seed, **overrides)
    return {i: [s.text for s in o] for i, o in enumerate(outs)}


def held_out_accuracy(rollouts: "Rollouts", prompts, examples: Sequence[Example], bank: TemplateBank, seed: int = 0,
                      verifier: Optional[VerifierConfig] = None, votes: int = 0, max_pixels: int = 1048576) -> dict:
    """Greedy task accuracy, and the judge's metrics (`judging.judge_report`: greedy accuracy, per label, AUROC and
    vote accuracy from `votes` verdicts sampled with the training settings, the solve-to-judge gap) on the
    examples' judge tasks, each prompt built exactly as training builds it and generated through the run's own
    rollouts (colocated or disaggregated engines, each its share). Answers are checked as the training rewards check
    them (`verifier`: the algorithm section's options). A collective of the training ranks."""
    verifier = verifier or VerifierConfig()
    greedy = dict(n=1, temperature=0.0)
    task_out = _texts(rollouts, prompts, [ex.messages for ex in examples], **greedy)
    solved = [score(task_out[i][0], ex.answer, verifier) == 1.0 for i, ex in enumerate(examples)]
    tasks = judge_tasks(examples, bank, seed)
    messages = [task_messages(t, max_pixels) for t in tasks]
    judge_out = _texts(rollouts, prompts, messages, **greedy)
    # (seeded: every evaluation of a run draws the same random numbers, so two evaluations differ by the weights)
    sampled = _texts(rollouts, prompts, messages, seed, n=votes) if votes else {}
    outcomes = [JudgeOutcome(t.kind, t.answer, POSITIVE["yesno" if t.answer in ("Yes", "No") else "ab"],
                             verdict_of(judge_out[k][0]), tuple(verdict_of(x) for x in sampled.get(k, ())),
                             solved[t.source_prompt_id]) for k, t in enumerate(tasks)]
    report = judge_report(outcomes)
    return {"task_accuracy": sum(solved) / max(1, len(solved)), "items": len(examples),
            **{f"judge_{k}": v for k, v in report.items() if v is not None}}


class HeldOutEval:
    """The run's held-out evaluation (the `eval` section): its items, when it is due, and its metrics. Built by
    `train.build_stack`, given to the trainer's loop, which asks `due` after each step (and brings the engines to
    the trained weights first)."""

    def __init__(self, examples: Sequence[Example], interval: int, rollouts: "Rollouts", prompts,
                 templates: TemplateBank, seed: int, verifier: VerifierConfig, votes: int, max_pixels: int):
        self.examples, self.interval, self.votes = list(examples), interval, votes
        self.rollouts, self.prompts, self.templates, self.seed = rollouts, prompts, templates, seed
        self.verifier, self.max_pixels = verifier, max_pixels

    @classmethod
    def from_config(cls, ev: "EvalConfig", max_pixels: int, recycled_max_pixels: int, **parts
                    ) -> Optional["HeldOutEval"]:
        """None when the section turns it off (`eval.interval: 0`); `max_pixels`: the data section's image bound
        (task prompts), `recycled_max_pixels`: recycling's (judge prompts); `parts`: the constructor's others."""
        if not ev.interval:
            return None
        return cls(load_held_out(ev.file, ev.max_items, max_pixels), ev.interval, votes=ev.judge_votes,
                   max_pixels=recycled_max_pixels, **parts)

    def measure(self) -> dict:
        """{task_accuracy, items, judge_*} now (a collective)."""
        return held_out_accuracy(self.rollouts, self.prompts, self.examples, self.templates, self.seed,
                                 self.verifier, self.votes, self.max_pixels)

    def due(self, step: int, total_steps: int, last: bool) -> bool:
        """After `step` (1-based): every `interval` steps, and after the run's last step (`last`: it ends early)."""
        return bool(self.examples) and (step % self.interval == 0 or step == total_steps or last)

    def __call__(self) -> dict:
        """The metrics: eval/task_accuracy, eval/items, eval/judge_* and time/eval (a collective)."""
        t0 = time.perf_counter()
        got = self.measure()
        return {**{f"eval/{k}": v for k, v in got.items()}, "time/eval": time.perf_counter() - t0}
