"""Counterfactual verdicts (`algorithm.recycle.counterfactual_verdicts`): which judge groups get the other verdict,
and how a response is rewritten. Pure functions; the trainer's use of them runs in
tests/dist/test_rollout_protocol.py (a stand-in engine's reward period)."""
from __future__ import annotations

import pytest

from megatron_spark.config import load_config
from megatron_spark.counterfactual import (counterfactual_swaps, other_verdict, sampled_judge_figures, swap_verdict,
                                           verdict_options)
from megatron_spark.kinds import TaskKind
from megatron_spark.reward import boxed_answer

P, W, T = TaskKind.POINTWISE, TaskKind.PAIRWISE, TaskKind.TASK


def test_options_and_other_verdict():
    assert verdict_options("Yes") == verdict_options("no") == ("Yes", "No")
    assert verdict_options("B") == ("A", "B")
    assert verdict_options("7") is None
    assert other_verdict("yes", ("Yes", "No")) == "No" and other_verdict("B", ("A", "B")) == "A"
    assert other_verdict("Maybe", ("Yes", "No")) is None and other_verdict(None, ("Yes", "No")) is None
    # read as the verifier reads it
    assert other_verdict("\\text{No}", ("Yes", "No")) == "Yes" and other_verdict("(B)", ("A", "B")) == "A"
    assert other_verdict("No.", ("Yes", "No")) == "Yes"


def test_swap_rewrites_every_box_of_the_verdict_and_nothing_else():
    assert swap_verdict("It is wrong. \\boxed{No}", "No", "Yes") == "It is wrong. \\boxed{Yes}"
    assert swap_verdict("\\boxed{ no } so \\boxed{No}", "no", "Yes") == "\\boxed{Yes} so \\boxed{Yes}"
    assert swap_verdict("\\box{A}", "A", "B") == "\\box{B}"
    assert swap_verdict("\\box{A}", "A", "B", accept_box_alias=False) is None  # (no box this verifier reads)
    # "Not" must not turn into "Yest": only a whole box content is swapped
    assert swap_verdict("\\boxed{Not}", "No", "Yes") is None


def test_only_judge_groups_without_spread_that_give_one_verdict_are_swapped():
    kinds = [P, P, W, T, P, P, P]
    labels = ["Yes", "No", "A", "3", "No", "Yes", "No"]
    texts = [["\\boxed{No}", "x \\boxed{No}", "\\boxed{No}"],     # all No on a Yes item: last one swapped
             ["\\boxed{No}", "\\boxed{Yes}", "\\boxed{No}"],      # spread: left alone
             ["\\boxed{B}", "no verdict", "\\boxed{B}"],          # all wrong, one without verdict: last B swapped
             ["\\boxed{2}", "\\boxed{2}", "\\boxed{2}"],          # a task, not a judge group
             ["nothing", "nothing", "nothing"],                   # no verdict to contrast
             ["\\boxed{Yes}", "\\boxed{Yes}", "\\boxed{Yes}"],   # all right: the swap is a wrong verdict
             ["\\boxed{No}", "\\boxed{No}", "no verdict"]]       # one verdict, but spread: it has a gradient
    rewards = [0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    swaps = counterfactual_swaps(kinds, labels, texts, rewards)
    assert [(s.group, s.sample) for s in swaps] == [(0, 2), (2, 2), (5, 2)]
    assert [boxed_answer(s.text) for s in swaps] == ["Yes", "A", "No"]
    assert swaps[0].text == "\\boxed{Yes}"


def test_a_verdict_in_another_form_is_swapped_and_a_truncated_sample_is_not():
    swaps = counterfactual_swaps([W], ["A"], [["\\boxed{(B)}", "\\boxed{(B)}"]], [0, 0])
    assert [(s.group, s.sample, boxed_answer(s.text)) for s in swaps] == [(0, 1, "A")]
    # the last sample was cut at the length limit: the one before it is swapped; all cut: none
    swaps = counterfactual_swaps([P], ["Yes"], [["\\boxed{No}", "\\boxed{No}"]], [0, 0], truncated=[[False, True]])
    assert [(s.group, s.sample) for s in swaps] == [(0, 0)]
    assert counterfactual_swaps([P], ["Yes"], [["\\boxed{No}", "\\boxed{No}"]], [0, 0], truncated=[[True, True]]) == []


def test_what_was_sampled_is_reported_before_the_swaps():
    kinds, labels = [P, W, T], ["Yes", "B", "3"]
    texts = [["\\boxed{No}", "\\boxed{No}"], ["\\boxed{A}", "\\boxed{B}"], ["\\boxed{3}", "\\boxed{1}"]]
    got = sampled_judge_figures(kinds, labels, texts, [0, 0, 0, 1, 1, 0])
    assert got == {"judge_groups_with_gradient_sampled": 0.5, "verdict_first_option_sampled": 0.25}
    # a period without judge tasks, or without any verdict, reports nothing (never NaN in metrics.jsonl)
    assert sampled_judge_figures([T], ["3"], [["\\boxed{3}"]], [1]) == {}
    no_verdict = sampled_judge_figures([P], ["Yes"], [["none", "none"]], [0, 0])
    assert no_verdict == {"judge_groups_with_gradient_sampled": 0.0}


def test_a_group_of_one_sample_is_no_group():
    assert counterfactual_swaps([P], ["Yes"], [["\\boxed{No}"]], [0]) == []


def test_refused_with_engine_logprobs():
    from megatron_spark.validation import validate

    cfg = load_config(None, ["algorithm.recycle.counterfactual_verdicts=true", "algorithm.old_logprobs=engine"])
    with pytest.raises(ValueError, match="config field 'algorithm.old_logprobs'.*counterfactual"):
        validate(cfg)
    # truncated importance sampling weighs a row without engine log-probs 1: allowed
    validate(load_config(None, ["algorithm.recycle.counterfactual_verdicts=true", "algorithm.rollout_is=tis"]))
