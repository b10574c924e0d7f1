"""Test-time self-reflection: answer, judge your own boxed answer, and if the verdict is not positive, reflect and
answer again; at most `max_rounds` judge/reflect rounds (SPARK evaluates with 2). The answer of the last reflection
is final and is not judged again.

The procedure is written once, as a generator that yields each prompt it needs answered and receives the model's
output (`reflection_steps`). `self_reflect` drives one question with a `generate(prompt, image) -> text` callable;
`self_reflect_batch` drives many in lockstep, one batched call per stage, which is what evaluation uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional, Sequence

from megatron_spark.kinds import TaskKind
from megatron_spark.reward import boxed_answer, extract_boxed, normalize
from megatron_spark.templates import Template, TemplateBank, with_suffix

Generate = Callable[[str, Optional[Any]], str]
GenerateBatch = Callable[[list[str], list[Optional[Any]]], list[str]]


@dataclass
class ReflectionRound:
    judge_output: Optional[str]      # None when there was no boxed answer to judge
    verdict: Optional[str]           # the judge's boxed verdict
    accepted: bool
    reflect_output: Optional[str] = None
    answer: Optional[str] = None     # the boxed answer after this round's reflection


@dataclass
class ReflectionTrace:
    answer: Optional[str]
    rounds: int
    accepted: bool
    first_output: str = ""
    first_answer: Optional[str] = None
    history: list[ReflectionRound] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (role, model output)

    @property
    def final_output(self) -> str:
        """The model output the final answer comes from."""
        for r in reversed(self.history):
            if r.reflect_output is not None:
                return r.reflect_output
        return self.first_output


def _accepts(verdict: Optional[str], template: Template) -> bool:
    if verdict is None:
        return False
    v = normalize(verdict).lower()
    return v == ("yes" if template.label_type == "yesno" else "a")


def default_templates(bank: Optional[TemplateBank] = None) -> tuple[Template, Template]:
    """The pointwise yes/no judge and the answer-reflection template used at test time."""
    bank = bank or TemplateBank.default()
    return (next(t for t in bank.families[TaskKind.POINTWISE] if t.label_type == "yesno"),
            bank.families[TaskKind.REFLECTION_ANS][-1])


def reflection_steps(question: str, max_rounds: int = 2, judge_template: Optional[Template] = None,
                     reflect_template: Optional[Template] = None, first_prompt: Optional[str] = None
                     ) -> Generator[tuple[str, str], str, ReflectionTrace]:
    """Yields (role, prompt) for each model call and receives the output; returns the trace. `question` is the bare
    question (no answer-format suffix); `first_prompt` overrides the first call's prompt (default: with suffix)."""
    judge_t, reflect_t = (judge_template, reflect_template) if judge_template and reflect_template else \
        default_templates()
    out = yield "answer", first_prompt if first_prompt is not None else with_suffix(question)
    trace = ReflectionTrace(answer=extract_boxed(out), rounds=0, accepted=False, first_output=out,
                            calls=[("answer", out)])
    trace.first_answer = trace.answer
    for r in range(max_rounds):
        rnd = ReflectionRound(judge_output=None, verdict=None, accepted=False)
        trace.history.append(rnd)
        if trace.answer is not None:
            rnd.judge_output = yield "judge", judge_t.render(question=question, answer=trace.answer)
            trace.calls.append(("judge", rnd.judge_output))
            rnd.verdict = boxed_answer(rnd.judge_output)  # (a hedge over several boxes gives no verdict)
            rnd.accepted = _accepts(rnd.verdict, judge_t)
        trace.rounds = r + 1
        if rnd.accepted:
            trace.accepted = True
            return trace
        rnd.reflect_output = yield "reflect", reflect_t.render(question=question, answer=trace.answer or "")
        trace.calls.append(("reflect", rnd.reflect_output))
        trace.answer = rnd.answer = extract_boxed(rnd.reflect_output)
    return trace


def self_reflect(generate: Generate, question: str, image: Any = None, bank: Optional[TemplateBank] = None,
                 max_rounds: int = 2, judge_template: Optional[Template] = None,
                 reflect_template: Optional[Template] = None) -> ReflectionTrace:
    judge_d, reflect_d = default_templates(bank)
    steps = reflection_steps(question, max_rounds, judge_template or judge_d, reflect_template or reflect_d)
    return _drive([steps], lambda prompts, images: [generate(p, i) for p, i in zip(prompts, images)], [image])[0]


def self_reflect_batch(generate_batch: GenerateBatch, questions: Sequence[str], images: Sequence[Any],
                       max_rounds: int = 2, judge_template: Optional[Template] = None,
                       reflect_template: Optional[Template] = None,
                       first_prompts: Optional[Sequence[str]] = None) -> list[ReflectionTrace]:
    """Every question's next call goes into one batch; the same calls, in the same order per question, as
    `self_reflect`."""
    judge_d, reflect_d = default_templates()
    steps = [reflection_steps(q, max_rounds, judge_template or judge_d, reflect_template or reflect_d,
                              first_prompts[i] if first_prompts is not None else None)
             for i, q in enumerate(questions)]
    return _drive(steps, generate_batch, list(images))


def _drive(steps: list[Generator], generate_batch: GenerateBatch, images: list[Any]) -> list[ReflectionTrace]:
    results: list[Optional[ReflectionTrace]] = [None] * len(steps)
    pending = {i: next(g)[1] for i, g in enumerate(steps)}
    while pending:
        order = sorted(pending)
        outs = generate_batch([pending[i] for i in order], [images[i] for i in order])
        pending = {}
        for i, out in zip(order, outs):
            try:
                pending[i] = steps[i].send(out)[1]
            except StopIteration as stop:
                results[i] = stop.value
    return results  # type: ignore[return-value]
