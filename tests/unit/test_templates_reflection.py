"""Template files and the test-time self-reflection policy."""
import json

import pytest

from megatron_spark.reflection import self_reflect
from megatron_spark.templates import ANSWER_SUFFIX, TemplateBank, with_suffix


def test_suffix_is_verbatim():
    assert ANSWER_SUFFIX == ("Please first conduct reasoning, and then answer the question. "
                             "Repeat the final answer using a '\\boxed{}'.")
    assert with_suffix("Q?") == "Q?\n" + ANSWER_SUFFIX


def test_user_template_file(tmp_path):
    spec = {"pointwise": [{"text": "J {question} {answer}", "label_type": "yesno"}],
            "pairwise": ["P {question} {answer_a} {answer_b}"], "reflection_cot": ["C {question} {cot}"],
            "reflection_ans": ["R {question} {answer}"]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(spec))
    bank = TemplateBank.load(p)
    assert bank.families["pairwise"][0].label_type == "ab"
    y = tmp_path / "t.yaml"
    y.write_text("pointwise:\n  - {text: 'J {question}', label_type: yesno}\n")
    with pytest.raises(ValueError, match=r"pointwise\[0\] lacks the placeholder \{answer\}"):
        TemplateBank.load(y)
    y.write_text("pointwise: []\n")
    with pytest.raises(ValueError, match="family 'pointwise' is missing or empty"):
        TemplateBank.load(y)


def scripted(outputs):
    calls = []

    def generate(prompt, image):
        calls.append(prompt)
        return outputs[len(calls) - 1]
    return generate, calls


def test_reflection_accepts_on_yes():
    gen, calls = scripted(["\\boxed{7}", "looks right \\boxed{Yes}"])
    tr = self_reflect(gen, "What is 3+4?")
    assert tr.answer == "7" and tr.accepted and tr.rounds == 1 and len(calls) == 2
    assert calls[0].endswith(ANSWER_SUFFIX)


def test_reflection_caps_rounds_and_keeps_last_answer():
    gen, calls = scripted(["\\boxed{6}", "\\boxed{No}", "\\boxed{8}", "\\boxed{No}", "\\boxed{7}"])
    tr = self_reflect(gen, "What is 3+4?", max_rounds=2)
    assert tr.answer == "7" and not tr.accepted and tr.rounds == 2 and len(calls) == 5
    assert "\n6\n" in calls[2] and "\n8\n" in calls[4]


def test_reflection_second_round_accept():
    gen, _ = scripted(["\\boxed{6}", "\\boxed{No}", "\\boxed{7}", "\\boxed{yes}"])
    tr = self_reflect(gen, "q")
    assert tr.answer == "7" and tr.accepted and tr.rounds == 2
