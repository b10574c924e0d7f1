"""Test-time self-reflection: answer, judge your own boxed answer, and if the verdict is not positive, reflect and
answer again; at most `max_rounds` judge/reflect rounds (SPARK evaluates with 2). The answer of the last reflection
is final and is not judged again. Works with any engine through a `generate(prompt, image) -> text` callable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_spark.reward import extract_boxed, normalize
from megatron_spark.templates import Template, TemplateBank, with_suffix

Generate = Callable[[str, Optional[Any]], str]


@dataclass
class ReflectionTrace:
    answer: Optional[str]
    rounds: int
    accepted: bool
    calls: list[tuple[str, str]] = field(default_factory=list)  # (role, model output)


def _accepts(verdict: Optional[str], template: Template) -> bool:
    if verdict is None:
        return False
    v = normalize(verdict).lower()
    return v == ("yes" if template.label_type == "yesno" else "a")


def self_reflect(generate: Generate, question: str, image: Any = None, bank: Optional[TemplateBank] = None,
                 max_rounds: int = 2, judge_template: Optional[Template] = None,
                 reflect_template: Optional[Template] = None) -> ReflectionTrace:
    bank = bank or TemplateBank.default()
    judge_t = judge_template or next(t for t in bank.families["pointwise"] if t.label_type == "yesno")
    reflect_t = reflect_template or bank.families["reflection_ans"][-1]
    out = generate(with_suffix(question), image)
    trace = ReflectionTrace(answer=extract_boxed(out), rounds=0, accepted=False, calls=[("answer", out)])
    for r in range(max_rounds):
        if trace.answer is None:
            verdict_ok = False
        else:
            judged = generate(judge_t.render(question=question, answer=trace.answer), image)
            trace.calls.append(("judge", judged))
            verdict_ok = _accepts(extract_boxed(judged), judge_t)
        trace.rounds = r + 1
        if verdict_ok:
            trace.accepted = True
            return trace
        out = generate(reflect_t.render(question=question, answer=trace.answer or ""), image)
        trace.calls.append(("reflect", out))
        trace.answer = extract_boxed(out)
    return trace
