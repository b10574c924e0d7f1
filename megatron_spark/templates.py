"""Prompt templates for the recycled SPARK tasks: pointwise and pairwise judging, reflection with CoT / answer.

The wording here is our own. Users can load any other set (for instance the paper's originals) from a YAML or
JSON file with the same four families. `ANSWER_SUFFIX` is the answer-format instruction the released Spark
models were trained with: it is an interface and is used verbatim.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from megatron_spark.kinds import RECYCLED_KINDS, TaskKind
from megatron_spark.reward import extract_all_boxed

ANSWER_SUFFIX = ("Please first conduct reasoning, and then answer the question. "
                 "Repeat the final answer using a '\\boxed{}'.")

FAMILIES = RECYCLED_KINDS  # (the template families)
FIELDS = {
    TaskKind.POINTWISE: ("question", "answer"),
    TaskKind.PAIRWISE: ("question", "answer_a", "answer_b"),
    TaskKind.REFLECTION_COT: ("question", "cot"),
    TaskKind.REFLECTION_ANS: ("question", "answer"),
}


_PLACEHOLDER = re.compile(r"\{(question|answer|answer_a|answer_b|cot)\}")


@dataclass(frozen=True)
class Template:
    text: str
    label_type: Literal["yesno", "ab", "answer"] = "answer"

    def render(self, **fields: str) -> str:
        """Fill {question}, {answer}, ... in one pass; other braces (\\boxed{}) and braces inside the inserted
        text are left alone, unlike str.format."""
        return _PLACEHOLDER.sub(lambda m: fields[m.group(1)] if m.group(1) in fields else m.group(0), self.text)


_JUDGE_TAIL_ONE = "\n\nQuestion:\n{question}\n\nProposed answer:\n{answer}\n\nYour judgement:"
_JUDGE_TAIL_TWO = "\n\nQuestion:\n{question}\n\n(A) {answer_a}\n(B) {answer_b}\n\nYour judgement:"

DEFAULT_TEMPLATES: dict[str, list[Template]] = {
    TaskKind.POINTWISE: [
        Template("Check the proposed answer to the question below. Work through the problem yourself, compare, and "
                 "decide whether the answer is right. Reply 'Yes' if it is correct and 'No' if it is not, and put "
                 "that single word in \\boxed{}." + _JUDGE_TAIL_ONE, "yesno"),
        Template("You are grading a student's final answer. Solve the question independently, then state whether "
                 "the student's answer is correct. Finish with your verdict, Yes or No, in \\boxed{}."
                 + _JUDGE_TAIL_ONE, "yesno"),
        Template("Is the answer below correct for this question? Reason step by step before you decide, then give "
                 "your verdict, Yes or No, inside \\boxed{}." + _JUDGE_TAIL_ONE, "yesno"),
        Template("Evaluate the answer to the question. Think it through, then pick one option:\nA. The answer is "
                 "correct.\nB. The answer is incorrect.\nWrite the letter of your choice inside \\boxed{}."
                 + _JUDGE_TAIL_ONE, "ab"),
        Template("Decide whether the given answer solves the question correctly. After your reasoning, choose A if "
                 "it is correct or B if it is wrong, and put the letter in \\boxed{}." + _JUDGE_TAIL_ONE, "ab"),
    ],
    TaskKind.PAIRWISE: [
        Template("Two candidate answers to the same question are given, and at most one of them is right. Work out "
                 "the question, compare both candidates, and put the letter of the correct one (A or B) in "
                 "\\boxed{}." + _JUDGE_TAIL_TWO, "ab"),
        Template("Which of the two answers below is correct? Reason carefully about the question first, then "
                 "answer with the letter A or B in \\boxed{}." + _JUDGE_TAIL_TWO, "ab"),
        Template("You are comparing two solutions' final answers. Determine which one answers the question "
                 "correctly and give its letter inside \\boxed{}." + _JUDGE_TAIL_TWO, "ab"),
    ],
    TaskKind.REFLECTION_COT: [
        Template("Below is a question and an attempted solution. Review the reasoning step by step. If it is "
                 "sound, restate the answer; if you find a mistake, fix it and solve the question correctly."
                 "\n\nQuestion:\n{question}\n\nAttempted solution:\n{cot}\n\n" + ANSWER_SUFFIX),
        Template("A previous attempt at this question is shown. Check each step for errors and produce a correct "
                 "solution of your own.\n\nQuestion:\n{question}\n\nPrevious attempt:\n{cot}\n\n" + ANSWER_SUFFIX),
        Template("The solution below reaches a wrong result. Do not follow its reasoning; solve the question again "
                 "from the beginning.\n\nQuestion:\n{question}\n\nFlawed solution:\n{cot}\n\n" + ANSWER_SUFFIX),
    ],
    TaskKind.REFLECTION_ANS: [
        Template("Here is a question and a proposed final answer. Decide whether the answer is right; if it is "
                 "not, work out the correct one.\n\nQuestion:\n{question}\n\nProposed answer:\n{answer}\n\n"
                 + ANSWER_SUFFIX),
        Template("Someone answered the question below. Verify their answer by solving the question yourself, and "
                 "give the correct final answer.\n\nQuestion:\n{question}\n\nTheir answer:\n{answer}\n\n"
                 + ANSWER_SUFFIX),
        Template("The answer given below is incorrect. Ignore it and solve the question carefully.\n\nQuestion:\n"
                 "{question}\n\nIncorrect answer:\n{answer}\n\n" + ANSWER_SUFFIX),
    ],
}


class TemplateBank:
    """The four families, each sampled uniformly at random by the caller's RNG."""

    def __init__(self, families: dict[str, list[Template]]):
        for fam in FAMILIES:
            if not families.get(fam):
                raise ValueError(f"templates: family '{fam}' is missing or empty; give at least one template")
            for i, t in enumerate(families[fam]):
                for field in FIELDS[fam]:
                    if "{" + field + "}" not in t.text:
                        raise ValueError(f"templates: {fam}[{i}] lacks the placeholder {{{field}}}")
                if fam == TaskKind.POINTWISE and t.label_type not in ("yesno", "ab"):
                    raise ValueError(f"templates: pointwise[{i}].label_type must be 'yesno' or 'ab'")
                filled = [b for b in extract_all_boxed(_PLACEHOLDER.sub("", t.text)) if b.strip()]
                if filled:
                    raise ValueError(f"templates: {fam}[{i}] names the boxed answer '\\boxed{{{filled[0]}}}': a "
                                     f"response that repeats the instruction would be scored as that answer; name "
                                     f"the options in words instead (e.g. \"answer Yes or No, in a box\")")
        self.families = families

    def sample(self, family: str, rng: random.Random) -> Template:
        return rng.choice(self.families[family])

    def judge_templates(self) -> dict[str, Template]:
        """The one template per judge kind that evaluations use (so that two evaluations compare): the first yes/no
        pointwise template (else the first pointwise one) and the first pairwise one."""
        pointwise = self.families[TaskKind.POINTWISE]
        return {TaskKind.POINTWISE: next((t for t in pointwise if t.label_type == "yesno"), pointwise[0]),
                TaskKind.PAIRWISE: self.families[TaskKind.PAIRWISE][0]}

    @classmethod
    def default(cls) -> "TemplateBank":
        return cls(DEFAULT_TEMPLATES)

    @classmethod
    def load(cls, path: Optional[str | Path]) -> "TemplateBank":
        """YAML or JSON: {pointwise: [{text, label_type}], pairwise: [...], reflection_cot: [...],
        reflection_ans: [...]}; a bare string is accepted for a template without a label type."""
        if path is None:
            return cls.default()
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"template file '{p}' does not exist")
        return cls.parse(p.read_text(), str(p))

    @classmethod
    def parse(cls, raw: Optional[str], name: str = "templates") -> "TemplateBank":
        """A template file's text (YAML, of which JSON is a subset); None: the built-in bank. (A run's prompt
        protocol stores the text, so an evaluation reads the templates the run trained on.)"""
        if raw is None:
            return cls.default()
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"template file '{name}' is neither YAML nor JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"template file '{name}': expected a mapping of the families {', '.join(FAMILIES)}")
        unknown = set(data) - set(FAMILIES)
        if unknown:
            raise ValueError(f"template file '{name}': unknown families {sorted(unknown)}; use "
                             f"{', '.join(FAMILIES)}")
        fams = {}
        for fam in FAMILIES:
            items = data.get(fam) or []
            default_label = {TaskKind.POINTWISE: "yesno", TaskKind.PAIRWISE: "ab"}.get(fam, "answer")
            fams[fam] = [Template(it, default_label) if isinstance(it, str) else
                         Template(it["text"], it.get("label_type", default_label)) for it in items]
        return cls(fams)


def with_suffix(question: str) -> str:
    """The training-task prompt: the question followed by the answer-format instruction."""
    return question.rstrip() + "\n" + ANSWER_SUFFIX


def strip_suffix(question: str) -> str:
    """Remove the instruction (either punctuation variant seen in Spark data) so it is not nested in new tasks."""
    q = question
    for variant in (ANSWER_SUFFIX, ANSWER_SUFFIX.replace("'\\boxed{}'.", "'\\boxed{}.'")):
        q = q.replace(variant, "")
    return q.rstrip()


def with_text(messages: list[dict], text: str) -> list[dict]:
    """A copy of a chat whose text parts all read `text` (its images kept): a task's prompt re-asked as another
    question about the same picture (judge items, the demo's warm start)."""
    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        for c in m["content"] if isinstance(m["content"], list) else []:
            if c.get("type") == "text":
                c["text"] = text
        if isinstance(m["content"], str):
            m["content"] = text
    return msgs
