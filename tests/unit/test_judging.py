"""The judge's metrics (megatron_spark/judging.py) on hand-computed cases."""
import pytest

from megatron_spark.judging import JudgeOutcome, auroc, judge_report, verdict_of


@pytest.mark.parametrize("scores,truth,expected", [
    ([0.9, 0.8, 0.2, 0.1], [True, True, False, False], 1.0),        # perfect ranking
    ([0.1, 0.2, 0.8, 0.9], [True, True, False, False], 0.0),        # perfectly reversed
    ([0.5, 0.5, 0.5, 0.5], [True, False, True, False], 0.5),        # a constant verdict: blind, whatever it is
    ([1.0, 1.0, 1.0, 1.0], [True, False, True, False], 0.5),
    ([0.8, 0.4, 0.6, 0.2], [True, True, False, False], 0.75),       # pairs (pos, neg): 0.8>0.6, 0.8>0.2, 0.4<0.6,
                                                                     # 0.4>0.2 -> 3 of 4
    ([0.5, 0.5, 0.2], [True, False, False], 0.75),                  # a tie counts half: (0.5 + 1) / 2
    ([0.3, 0.7], [True, True], None),                               # one class only: undefined
])
def test_auroc_hand_computed(scores, truth, expected):
    got = auroc(scores, truth)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_auroc_matches_the_pairwise_definition_on_random_cases():
    import random

    rnd = random.Random(0)
    for _ in range(50):
        n = rnd.randint(2, 20)
        scores = [rnd.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        truth = [rnd.random() < 0.5 for _ in range(n)]
        pos = [s for s, t in zip(scores, truth) if t]
        neg = [s for s, t in zip(scores, truth) if not t]
        if not pos or not neg:
            continue
        brute = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert auroc(scores, truth) == pytest.approx(brute)


@pytest.mark.parametrize("text,verdict", [
    ("\\boxed{Yes}", "yes"), ("so \\boxed{no}.", "no"), ("\\boxed{(A)}", "a"), ("\\boxed{3}", "other"),
    ("no box", None), ("\\boxed{Yes} or \\boxed{No}", None), ("\\boxed{B} ... \\boxed{B}", "b"),
])
def test_verdict_of(text, verdict):
    assert verdict_of(text) == verdict


def _item(label, greedy, votes, solved=None, kind="pointwise"):
    positive = "yes" if label in ("Yes", "No") else "a"
    return JudgeOutcome(kind, label, positive, greedy, tuple(votes), solved)


def test_a_constant_judge_reads_chance_everywhere_it_should():
    items = [_item("Yes", "yes", ["yes"] * 4), _item("No", "yes", ["yes"] * 4)] * 8
    r = judge_report(items)
    assert r["accuracy"] == 0.5 and r["auroc"] == 0.5
    assert r["accuracy_yes"] == 1.0 and r["accuracy_no"] == 0.0 and r["min_label_accuracy"] == 0.0
    assert r["vote_accuracy"] == 0.5 and r["p_right"] == 1.0


def test_votes_see_learning_that_the_greedy_verdict_does_not():
    """The greedy verdict is always Yes (accuracy 0.5), but the sampled verdicts say Yes more often on right
    answers: AUROC 1.0."""
    items = [_item("Yes", "yes", ["yes", "yes", "yes", "no"]), _item("No", "yes", ["yes", "yes", "no", "no"])] * 4
    r = judge_report(items)
    assert r["accuracy"] == 0.5 and r["auroc"] == 1.0
    assert r["vote_accuracy"] == 0.5  # (a 2-2 tie is not a majority for No)


def test_solve_to_judge_gap_and_kinds():
    items = [_item("Yes", "yes", [], solved=True), _item("No", "yes", [], solved=True),
             _item("No", "no", [], solved=False), _item("A", "b", [], solved=True, kind="pairwise"),
             _item("B", "b", [], solved=None, kind="pairwise")]
    r = judge_report(items)
    assert r["solved_misjudged"] == pytest.approx(2 / 3)      # of the 3 solved items, 2 misjudged
    assert r["pointwise_items"] == 3 and r["pairwise_items"] == 2
    assert r["pairwise_accuracy"] == 0.5 and r["pairwise_accuracy_a"] == 0.0 and r["pairwise_accuracy_b"] == 1.0
    assert r["vote_accuracy"] is None                         # no votes taken
    assert r["pointwise_auroc"] == pytest.approx(0.75)        # greedy verdicts as 0/1 scores: Yes 1 vs No (1, 0)
    assert r["no_verdict"] == 0.0
