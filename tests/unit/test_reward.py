"""The verifier: extraction, equivalence via math-verify, and the hard per-item time limit."""
import time

import pytest

from megatron_spark.reward import RewardPool, VerifierConfig, extract_boxed, score


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} first, finally \\boxed{2}", "2"),                 # several boxes: the last one
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a_{1}^{2}}", "a_{1}^{2}"),                          # nested braces
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\box{Yes}", "Yes"),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_box_alias_is_configurable():
    assert extract_boxed("\\box{Yes}", accept_box_alias=False) is None


@pytest.mark.parametrize("response,gold,reward", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),                        # fraction vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),                               # percentage
    ("\\boxed{2}", "2.0", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),                            # interval
    ("\\boxed{[0, 1)}", "(0,1)", 0.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # bare-LaTeX gold must still parse
    ("\\boxed{B}", "B", 1.0),                                     # letters
    ("\\boxed{B}", "A", 0.0),
    ("\\boxed{(A)}", "A", 1.0),
    ("\\boxed{\\text{Yes}}", "Yes", 1.0),                          # \text{}-wrapped labels
    ("\\boxed{yes}", "Yes", 1.0),                                 # labels case-insensitive by default
    ("\\boxed{No}", "Yes", 0.0),
    ("I think 42.", "42", 0.0),                                    # no box -> no reward
    ("\\boxed{41} wait, \\boxed{42}", "42", 0.0),                  # two different answers: none (SPARK)
    ("\\boxed{42}", "", 0.0),                                      # empty gold never rewards
])
def test_score(response, gold, reward):
    assert score(response, gold) == reward


def test_case_sensitive_labels_when_configured():
    assert score("\\boxed{yes}", "Yes", VerifierConfig(labels_case_insensitive=False)) == 0.0


@pytest.mark.slow
def test_pool_matches_sequential_and_times_out_pathological_item():
    responses = ["Reasoning... \\boxed{\\frac{3}{4}}", "\\boxed{0.75}", "\\boxed{1}", "\\boxed{Yes}"]
    golds = ["0.75", "\\frac{3}{4}", "2", "Yes"]
    pathological = "\\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}"
    with RewardPool(workers=2, timeout_s=1.5) as pool:
        assert pool.score(responses, golds) == [score(r, g) for r, g in zip(responses, golds)]
        t0 = time.monotonic()
        out = pool.score(responses[:2] + [pathological] + responses[2:], golds[:2] + ["1"] + golds[2:])
        elapsed = time.monotonic() - t0
        assert out == [1.0, 1.0, 0.0, 0.0, 1.0]
        assert pool.stats.timeouts == 1
        # the item costs its limit; the warm spare replaces its worker at once (before: limit + a worker start)
        assert 1.5 <= pool.stats.worst_item_s < 1.5 + 0.5 and pool.stats.replace_wait_s < 0.3
        assert 1.5 <= elapsed < 1.5 + 0.5 + 0.5, elapsed
        assert pool.score(["\\boxed{2}"], ["2"]) == [1.0]  # the replaced worker serves again


@pytest.mark.slow
def test_three_pathological_items_in_a_batch_of_100_cost_their_limit():
    """Spread over a batch: each timed-out item costs its limit plus scheduling noise (< 0.5 s), whichever worker
    it lands on; the batch finishes with every other item scored as a sequential check would."""
    pathological = "\\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}"
    responses = [f"so \\boxed{{{k}}}" for k in range(100)]
    golds = [str(k if k % 3 else k + 1) for k in range(100)]
    for k in (10, 50, 90):
        responses[k], golds[k] = pathological, "1"
    with RewardPool(workers=2, timeout_s=1.0) as pool:
        out = pool.score(responses, golds)
        assert pool.stats.timeouts == 3 and pool.stats.worst_item_s < 1.0 + 0.5, pool.stats
    assert out == [0.0 if k in (10, 50, 90) else float(k % 3 != 0) for k in range(100)]


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        RewardPool(workers=0)


# -- tests written for mutants that survived the first mutation run (scripts/mutants.sh) ----------------------------
@pytest.mark.parametrize("text,expected", [
    ("\\boxed{1}\\boxed{2}", "2"),              # adjacent boxes: scanning resumes right after the first one
    ("\\boxed{1}}\\boxed{2}", "2"),
    ("\\boxed{{1}}x\\boxed{2", "{1}"),          # an unclosed last box: the last complete one
])
def test_extract_boxed_scans_past_each_box(text, expected):
    assert extract_boxed(text) == expected


def test_boxed_still_found_without_the_alias():
    assert extract_boxed("so \\boxed{7}", accept_box_alias=False) == "7"
    assert extract_boxed("\\boxed {7}", accept_box_alias=False) == "7"
    assert score("\\box{7}", "7", VerifierConfig(accept_box_alias=False)) == 0.0
    assert score("\\box{7}", "7", VerifierConfig(accept_box_alias=True)) == 1.0


@pytest.mark.parametrize("raw,normal", [
    ("$42$", "42"), ("1\\!000", "1000"), ("1\\,000", "1000"), ("1\\ 000", "1000"), (" 4 2 ", "42"),
    ("42.", "42"), (".5", ".5"), ("2X", "2X"), ("(a)", "a"), ("b:", "b"),
    ("\\text{\\textbf{\\mathrm{\\mathbf{Yes}}}}", "Yes"),
])
def test_normalize(raw, normal):
    from megatron_spark.reward import normalize

    assert normalize(raw) == normal


def test_unparseable_answers_are_wrong_not_crashes():
    from megatron_spark.reward import check

    assert check("\\frac{", "\\sqrt{", VerifierConfig()) is False
    assert check("x", "y", VerifierConfig()) is False


@pytest.mark.slow
def test_pool_argument_boundaries_and_stats():
    with pytest.raises(ValueError, match="RewardPool: timeout_s must be > 0, got 0"):
        RewardPool(workers=1, timeout_s=0)
    with RewardPool(workers=1, timeout_s=0.5) as pool:  # one worker and sub-second limits are fine
        with pytest.raises(ValueError, match="RewardPool.score: 2 responses but 1 gold answers"):
            pool.score(["a", "b"], ["a"])
        assert pool.score(["\\boxed{1}", "\\boxed{2}"] * 3, ["1", "1"] * 3) == [1.0, 0.0] * 3
        first = pool.stats.seconds
        assert pool.score(["\\boxed{3}"], ["3"]) == [1.0]
        assert pool.stats.items == 7 and first < pool.stats.seconds < 60 and pool.stats.timeouts == 0
        assert 0 < pool.stats.worst_item_s < 60


# -- verifier options beyond SPARK's (off by default) -------------------------------------------------------------
def test_all_boxed_reads_every_box_as_a_set():
    from megatron_spark.reward import check_set, elements

    on = VerifierConfig(all_boxed=True)
    assert elements("\\{1, -2\\}") == ["1", "-2"] and elements("(2, 1), (1, 2)") == ["(2, 1)", "(1, 2)"]
    assert elements("x_{1}=3,\\quad x_{2}=5") == ["3", "5"] and elements("[0, 1)") == ["[0, 1)"]
    assert score("\\boxed{x=2, y=1}", "x=1, y=2", on) == 0.0 and score("\\boxed{y=2, x=1}", "x=1, y=2", on) == 1.0
    assert elements("x=1, y=2") == ["x=1", "y=2"]  # named unknowns keep their names: values cannot swap
    two = "so n = \\boxed{-2} and n = \\boxed{1}."
    assert score(two, "1, -2") == 0.0 and score(two, "1, -2", on) == 1.0  # the seed takes the last box only
    assert score("\\boxed{1,-2}", "\\boxed{1}\\boxed{-2}", on) == 1.0      # either side may be the set
    assert score("\\boxed{(1, 2)}, \\boxed{(2, 1)}", "(2,1),(1,2)", on) == 1.0
    assert score("\\boxed{3}. Check: \\boxed{3}", "3", on) == 1.0          # repeats count once
    assert score(two, "1, -2, 5", on) == 0.0 and score(two, "1, 2", on) == 0.0   # a missing or a wrong element
    assert score("\\boxed{1} then \\boxed{2}", "2", on) == 0.0             # {1, 2} is not the answer 2
    assert score("\\boxed{Yes} \\boxed{No}", "No", on) == 0.0 and score("\\boxed{No} \\boxed{Yes}", "No", on) == 0.0
    assert check_set(["1", "1"], ["1"]) and not check_set(["1", "2"], ["1", "1"])


def test_decimal_comma_only_against_a_decimal_number():
    on = VerifierConfig(decimal_comma=True)
    assert score("\\boxed{3,5}", "3.5") == 0.0 and score("\\boxed{3,5}", "3.5", on) == 1.0
    assert score("\\boxed{1.22}", "1,22", on) == 1.0
    assert score("\\boxed{3,5}", "3,5", on) == 1.0
    assert score("\\boxed{1,2}", "1.3", on) == 0.0
    assert score("\\boxed{10,455}", "10.455", on) == 0.0  # three digits after the comma: a thousands separator
    assert score("\\boxed{2,5}", "25", on) == 0.0  # no decimal number opposite: no decimal reading


def test_numeric_tolerance_for_rounded_answers():
    from megatron_spark.reward import numeric_value

    assert abs(numeric_value("\\frac{1}{3}") - 1 / 3) < 1e-12 and abs(numeric_value("\\sqrt{2}") - 2 ** 0.5) < 1e-12
    assert numeric_value("x + 1") is None and numeric_value("1, 2") is None and numeric_value("1112_3") is None
    tol = VerifierConfig(numeric_rel_tol=1e-3)
    assert score("\\boxed{0.3333}", "\\frac{1}{3}") == 0.0 and score("\\boxed{0.3333}", "\\frac{1}{3}", tol) == 1.0
    assert score("\\boxed{1.414}", "\\sqrt{2}", tol) == 1.0 and score("\\boxed{1.41}", "\\sqrt{2}", tol) == 0.0
    assert score("\\boxed{3.14}", "\\pi", VerifierConfig(numeric_rel_tol=1e-3)) == 1.0
    assert score("\\boxed{-2}", "2", VerifierConfig(numeric_rel_tol=0.5)) == 0.0
    assert score("\\boxed{2017}", "2016", tol) == 0.0 and score("\\boxed{2016.4}", "2016", tol) == 1.0  # counts
    # are exact; a decimal approximation is within the tolerance


@pytest.mark.slow
def test_verifier_options_reach_the_reward_pool():
    """The config's answer_* fields are the pool's VerifierConfig (a validated field that changes nothing is a bug):
    each option, flipped in the algorithm section, changes the score it must change."""
    from megatron_spark.config import load_config

    base = VerifierConfig.from_config(load_config(None, []).algorithm)
    cases = {"algorithm.accept_box_alias=false": ("\\box{4}", "4"),
             "algorithm.labels_case_insensitive=false": ("\\boxed{yes}", "Yes"),
             "algorithm.answer_all_boxed=true": ("\\boxed{1} and \\boxed{2}", "1, 2"),
             "algorithm.answer_decimal_comma=true": ("\\boxed{3,5}", "3.5"),
             "algorithm.answer_rel_tol=0.001": ("\\boxed{0.3333}", "\\frac{1}{3}")}
    for override, (response, gold) in cases.items():
        cfg = VerifierConfig.from_config(load_config(None, [override]).algorithm)
        assert score(response, gold, cfg) != score(response, gold, base), override
    pool = RewardPool.from_config(load_config(None, ["algorithm.answer_rel_tol=0.001"]).algorithm)
    try:
        assert pool.cfg.numeric_rel_tol == 0.001
    finally:
        pool.close()



# -- a reward that cannot be gamed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("response,gold,reward", [
    ("\\boxed{No} or \\boxed{Yes}", "Yes", 0.0),                  # a hedge names both verdicts: no verdict
    ("\\boxed{Yes} or \\boxed{No}", "No", 0.0),
    ("\\boxed{A} ... \\boxed{B}", "B", 0.0),
    ("first \\boxed{3} then \\boxed{4}", "4", 0.0),               # two different answers (SPARK's set reading)
    ("\\boxed{4}. So the answer is \\boxed{4}.", "4", 1.0),       # one answer, repeated
    ("\\boxed{yes} ... \\boxed{Yes}", "Yes", 1.0),                # the same verdict in another case
    ("\\boxed{\\frac12}, i.e. \\boxed{0.5}", "0.5", 1.0),         # the gold written two ways
])
def test_different_boxed_answers_score_zero(response, gold, reward):
    assert score(response, gold) == reward


def _shipped_banks():
    from pathlib import Path

    from megatron_spark.templates import TemplateBank

    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "examples" / "templates").glob("*.y*ml"))
    assert files, "the shipped template files moved"
    return [("built-in", TemplateBank.default())] + [(f.name, TemplateBank.load(f)) for f in files]


def test_echoing_any_shipped_template_earns_nothing():
    """A response that repeats a template's instruction (the rendered prompt, or any line of it) is never rewarded,
    whatever the label: no template names a boxed verdict, and a hedge over several boxes scores 0."""
    fields = {"question": "Which colour fills most of the picture? Answer with its number: 1 for red, 2 for blue.",
              "answer": "2", "answer_a": "1", "answer_b": "2", "cot": "It is red, so \\boxed{1}."}
    golds = ["Yes", "No", "A", "B", "2", "3"]
    for source, bank in _shipped_banks():
        for family, templates in bank.families.items():
            for i, t in enumerate(templates):
                text = t.render(**fields)
                for echo in [text, *text.splitlines()]:
                    for gold in golds:
                        assert score(echo, gold) == 0.0, f"{source} {family}[{i}] echoed earns {gold}: {echo!r}"


def test_a_template_naming_a_boxed_answer_is_refused():
    from megatron_spark.templates import Template, TemplateBank

    families = {k: list(v) for k, v in TemplateBank.default().families.items()}
    families["pointwise"].append(Template("{question} {answer} Finish with \\boxed{Yes} or \\boxed{No}.", "yesno"))
    nested = {**families, "pointwise": families["pointwise"][:5] + [Template("{question} {answer} e.g. "
                                                                             "\\boxed{\\text{A}}", "ab")]}
    with pytest.raises(ValueError, match=r"pointwise\[5\].*text\{A\}"):  # (nested braces too)
        TemplateBank(nested)
    with pytest.raises(ValueError, match=r"pointwise\[5\].*\\boxed\{Yes\}.*in words"):
        TemplateBank(families)
