"""Recycling: every branch by hand, and properties over random batches."""
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spark.recycle import AuxQueue, Group, RecycleSettings, judge_task, recycle, reflection_task
from megatron_spark.templates import Template, TemplateBank, DEFAULT_TEMPLATES

BANK = TemplateBank.default()
YESNO = TemplateBank({**DEFAULT_TEMPLATES, "pointwise": [t for t in DEFAULT_TEMPLATES["pointwise"]
                                                         if t.label_type == "yesno"]})


def grp(rewards, answers=None, pid=0, image=None):
    answers = answers or [str(i) for i in range(len(rewards))]
    return Group(pid, "What is x?\nPlease first conduct reasoning, and then answer the question. Repeat the final "
                      "answer using a '\\boxed{}'.", "7", [f"work... \\boxed{{{a}}}" for a in answers],
                 rewards, image)


def test_all_correct_gives_positive_pointwise_on_first_answer():
    t = judge_task(grp([1, 1, 1], ["7", "7.0", "14/2"]), YESNO, RecycleSettings.of(), random.Random(0))
    assert t.kind == "pointwise" and t.answer == "Yes" and t.source_correct
    assert "Proposed answer:\n7\n" in t.prompt and "Please first conduct" not in t.prompt


def test_all_wrong_gives_negative_pointwise():
    t = judge_task(grp([0, 0], ["3", "4"]), YESNO, RecycleSettings.of(), random.Random(0))
    assert t.kind == "pointwise" and t.answer == "No" and t.source_correct is False


def test_ab_template_labels():
    ab = TemplateBank({**DEFAULT_TEMPLATES, "pointwise": [Template("{question} {answer}", "ab")]})
    assert judge_task(grp([1, 1]), ab, RecycleSettings.of(), random.Random(0)).answer == "A"
    assert judge_task(grp([0, 0]), ab, RecycleSettings.of(), random.Random(0)).answer == "B"


def test_mixed_group_pointwise_or_pairwise_by_probability():
    g = grp([1, 0, 0, 1], ["7", "3", "4", "7"])
    kinds = [judge_task(g, YESNO, RecycleSettings.of(pointwise_prob_mixed=p), random.Random(s)).kind
             for p in (0.0, 1.0) for s in range(20)]
    assert set(kinds[:20]) == {"pairwise"} and set(kinds[20:]) == {"pointwise"}
    for s in range(20):
        t = judge_task(g, YESNO, RecycleSettings.of(pointwise_prob_mixed=0.0), random.Random(s))
        correct_slot = "(A) 7" if t.answer == "A" else "(B) 7"
        assert correct_slot in t.prompt
    slots = {judge_task(g, YESNO, RecycleSettings.of(pointwise_prob_mixed=0.0), random.Random(s)).answer
             for s in range(20)}
    assert slots == {"A", "B"}


def test_reflection_modes_and_sources():
    g = grp([1, 0], ["7", "3"])
    cot = reflection_task(g, True, BANK, random.Random(0))
    assert cot.kind == "reflection_cot" and cot.answer == "7" and "work... \\boxed{3}" in cot.prompt
    ans = reflection_task(g, False, BANK, random.Random(0))
    assert ans.kind == "reflection_ans" and "\n3\n" in ans.prompt and "work..." not in ans.prompt
    assert reflection_task(grp([1, 1]), True, BANK, random.Random(0)) is None
    assert ans.prompt.rstrip().endswith("'\\boxed{}'.")


def test_caps_order_and_image_carried():
    groups = [grp([1, 0], ["7", "3"], pid=i, image=f"img{i}.png") for i in range(10)]
    tasks = recycle(groups, BANK, RecycleSettings.of(judge_cap=3, reflection_cap=4, cot_fraction=0.5),
                    random.Random(1))
    kinds = [t.kind for t in tasks]
    assert len(tasks) == 7
    assert all(k in ("pointwise", "pairwise") for k in kinds[:3])
    assert all(k.startswith("reflection") for k in kinds[3:])
    assert all(t.image == f"img{t.source_prompt_id}.png" for t in tasks)
    rec = tasks[0].to_record()
    assert '"image": "img' in rec["message"] and '"max_pixels": 1048576' in rec["message"]
    # the first half of the groups feed CoT reflections, the rest answer-only
    all_refl = recycle(groups, BANK, RecycleSettings.of(reflection_cap=100), random.Random(1))
    modes = {t.source_prompt_id: t.kind for t in all_refl if t.kind.startswith("reflection")}
    assert all(modes[i] == ("reflection_cot" if i < 5 else "reflection_ans") for i in range(10))


def test_deterministic_under_seed():
    groups = [grp([i % 2, 1, 0], pid=i) for i in range(8)]
    a = recycle(groups, BANK, RecycleSettings.of(), random.Random(5))
    b = recycle(groups, BANK, RecycleSettings.of(), random.Random(5))
    assert [(t.prompt, t.answer) for t in a] == [(t.prompt, t.answer) for t in b]


def test_queue_releases_full_batches_and_resets_per_episode():
    q = AuxQueue(batch_size=3)
    q.start_episode(0)
    tasks = recycle([grp([1, 0], pid=i) for i in range(2)], BANK, RecycleSettings.of(), random.Random(0))
    q.push(tasks)
    assert len(q) == 4 and len(q.pop_batch()) == 3 and q.pop_batch() is None
    state = q.state_dict()
    q2 = AuxQueue(batch_size=1)
    q2.load_state_dict(state)
    assert len(q2) == 1 and q2.batch_size == 3
    q.start_episode(1)
    assert len(q) == 0
    with pytest.raises(RuntimeError):
        AuxQueue(2).push(tasks)


answers = st.sampled_from(["1", "2", "3", "x+1", "\\frac{1}{2}"])
group_st = st.lists(st.tuples(st.booleans(), answers), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(group_st, min_size=1, max_size=10), st.integers(0, 10_000), st.floats(0, 1))
def test_properties(batch, seed, p_point):
    groups = [Group(i, f"question {i}", "gold", [f"\\boxed{{{a}}}" for _, a in g], [float(ok) for ok, _ in g])
              for i, g in enumerate(batch)]
    by_id = {g.prompt_id: g for g in groups}
    tasks = recycle(groups, BANK, RecycleSettings.of(pointwise_prob_mixed=p_point), random.Random(seed))
    for t in tasks:
        g = by_id[t.source_prompt_id]
        if t.kind == "pointwise":
            # the label always agrees with the reward of the judged answer
            assert t.answer in (("Yes", "A") if t.source_correct else ("No", "B"))
            if all(r == 1 for r in g.rewards):
                assert t.source_correct
            if all(r == 0 for r in g.rewards):
                assert not t.source_correct
        elif t.kind == "pairwise":
            assert 0 < sum(g.rewards) < len(g.rewards)
        else:
            assert any(r == 0 for r in g.rewards)  # never from an all-correct group
            assert t.answer == "gold"
    assert sum(t.kind in ("pointwise", "pairwise") for t in tasks) <= 32


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(1, 5))
def test_queue_never_leaks_across_episodes(pushes, batch):
    q = AuxQueue(batch_size=batch)
    for ep, n in enumerate(pushes):
        q.start_episode(ep)
        q.push([type("T", (), {"ep": ep})() for _ in range(n)])
        while (b := q.pop_batch()) is not None:
            assert all(t.ep == ep for t in b)


# -- independent oracles: labels read back from the prompt text, never from the code's own bookkeeping -----------
MARKED = TemplateBank({
    "pointwise": [Template("{question} || judged: {answer} || yes or no", "yesno"),
                  Template("{question} || judged: {answer} || A or B", "ab")],
    "pairwise": [Template("{question} || A: {answer_a} || B: {answer_b} ||")],
    "reflection_cot": [Template("{question} || wrong work: {cot} ||")],
    "reflection_ans": [Template("{question} || wrong answer: {answer} ||")],
})


def field(prompt: str, key: str) -> str:
    return prompt.split(f"|| {key}: ", 1)[1].split(" ||", 1)[0]


def hand_group(pid: int, rewards: list[int]) -> Group:
    """Every response has its own answer: c<i> for a correct one, w<i> for a wrong one."""
    answers = [f"{'c' if r else 'w'}{i}" for i, r in enumerate(rewards)]
    return Group(pid, "Q?", "gold", [f"step {i} \\boxed{{{a}}}" for i, a in enumerate(answers)],
                 [float(r) for r in rewards])


@pytest.mark.parametrize("seed", range(5))
def test_every_label_is_the_judged_answers_correctness(seed):
    rnd = random.Random(seed)
    groups = [hand_group(i, [rnd.randint(0, 1) for _ in range(rnd.randint(1, 6))]) for i in range(64)]
    tasks = recycle(groups, MARKED, RecycleSettings.of(judge_cap=64, reflection_cap=64), random.Random(seed))
    by_id = {g.prompt_id: g for g in groups}
    assert len(tasks) > 40
    for t in tasks:
        g = by_id[t.source_prompt_id]
        if t.kind == "pointwise":
            correct = field(t.prompt, "judged").startswith("c")
            yes = "yes or no" in t.prompt
            assert t.answer == (("Yes" if correct else "No") if yes else ("A" if correct else "B")), t
        elif t.kind == "pairwise":
            a, b = field(t.prompt, "A"), field(t.prompt, "B")
            assert {a[0], b[0]} == {"c", "w"}, t.prompt
            assert t.answer == ("A" if a.startswith("c") else "B")
        elif t.kind == "reflection_ans":
            assert field(t.prompt, "wrong answer").startswith("w") and t.answer == "gold"
        else:
            work = field(t.prompt, "wrong work")
            assert work in g.responses and g.rewards[g.responses.index(work)] == 0 and t.answer == "gold"


def test_mixed_groups_split_pointwise_pairwise_at_the_configured_rate():
    """Over 4000 mixed groups: pointwise with probability 0.3 (else pairwise), the judged class and the correct
    answer's slot each 50/50; every rate within 4.5 binomial standard deviations."""
    n, p = 4000, 0.3
    rng = random.Random(0)
    tasks = [judge_task(hand_group(i, [1, 0, 1, 0]), MARKED, RecycleSettings.of(pointwise_prob_mixed=p), rng)
             for i in range(n)]

    def within(k, m, q):
        return abs(k / m - q) <= 4.5 * (q * (1 - q) / m) ** 0.5

    point = [t for t in tasks if t.kind == "pointwise"]
    pair = [t for t in tasks if t.kind == "pairwise"]
    assert len(point) + len(pair) == n
    assert within(len(point), n, p), len(point) / n
    assert within(sum(field(t.prompt, "judged").startswith("c") for t in point), len(point), 0.5)
    assert within(sum(t.answer == "A" for t in pair), len(pair), 0.5)


def test_mixed_group_falls_back_to_the_class_that_has_an_answer():
    """A mixed group whose correct (or wrong) responses have no boxed answer can only be judged on the other class."""
    no_good = Group(0, "Q?", "gold", ["seven, no box", "\\boxed{w1}"], [1.0, 0.0])
    no_bad = Group(1, "Q?", "gold", ["\\boxed{c0}", "three, no box"], [1.0, 0.0])
    for seed in range(30):
        t = judge_task(no_good, MARKED, RecycleSettings.of(pointwise_prob_mixed=1.0), random.Random(seed))
        assert field(t.prompt, "judged") == "w1" and t.answer in ("No", "B") and t.source_correct is False
        t = judge_task(no_bad, MARKED, RecycleSettings.of(pointwise_prob_mixed=1.0), random.Random(seed))
        assert field(t.prompt, "judged") == "c0" and t.answer in ("Yes", "A") and t.source_correct is True
        # pairwise needs one answer of each class: none
        assert judge_task(no_good, MARKED, RecycleSettings.of(pointwise_prob_mixed=0.0), random.Random(seed)) is None


def test_default_caps_keep_32_judge_and_32_reflection_tasks_of_64_groups():
    groups = [hand_group(i, [1, 0, 0, 1]) for i in range(64)]
    s = RecycleSettings.of()
    assert (s.judge_cap, s.reflection_cap) == (32, 32)  # (the config section's defaults, written there once)
    tasks = recycle(groups, MARKED, s, random.Random(3))
    judge = [t for t in tasks if t.kind in ("pointwise", "pairwise")]
    refl = [t for t in tasks if t.kind.startswith("reflection")]
    assert len(judge) == 32 and len(refl) == 32 and tasks == judge + refl
    assert len({t.source_prompt_id for t in judge}) == 32 and len({t.source_prompt_id for t in refl}) == 32
    # a random subset, not the first 32 groups
    assert max(t.source_prompt_id for t in judge) >= 32 and max(t.source_prompt_id for t in refl) >= 32
    # groups 0..31 feed CoT reflections, 32..63 answer-only ones (cot_fraction 0.5 of all 64 groups)
    assert all((t.kind == "reflection_cot") == (t.source_prompt_id < 32) for t in refl)


# -- tests written for mutants that survived the first mutation run (scripts/mutants.sh) ----------------------------
def test_record_format_is_the_spark_chat_format():
    t = recycle([hand_group(0, [1, 0])], MARKED, RecycleSettings.of(), random.Random(0))[0]
    t.image = "img.png"
    rec = t.to_record(max_pixels=3136)
    assert set(rec) == {"message", "answer"} and rec["answer"] == t.answer
    assert json.loads(rec["message"]) == [{"role": "user", "content": [
        {"type": "image", "image": "img.png", "max_pixels": 3136}, {"type": "text", "text": t.prompt}]}]
    t.image = None
    assert json.loads(t.to_record()["message"])[0]["content"] == [{"type": "text", "text": t.prompt}]


def test_every_task_quotes_the_question_without_the_answer_suffix_and_a_real_answer():
    suffix = "\nPlease first conduct reasoning, and then answer the question. Repeat the final answer using a " \
             "'\\boxed{}'."
    groups = [Group(i, "Q?" + suffix, "gold", [f"\\boxed{{{'c' if r else 'w'}{j}}}" for j, r in enumerate(rw)],
                    [float(r) for r in rw]) for i, rw in enumerate([[1, 1], [0, 0], [1, 0], [0, 1, 0]] * 4)]
    for seed in range(10):
        tasks = recycle(groups, MARKED, RecycleSettings.of(pointwise_prob_mixed=0.5, judge_cap=64, reflection_cap=64,
                                                        cot_fraction=0.5), random.Random(seed))
        assert {t.kind for t in tasks} == {"pointwise", "pairwise", "reflection_cot", "reflection_ans"}
        for t in tasks:
            assert t.prompt.startswith("Q? || ") and "Please first conduct" not in t.prompt, t.prompt
            g = groups[t.source_prompt_id]
            answers = {f"{'c' if r else 'w'}{j}" for j, r in enumerate(g.rewards)}
            for key in ("judged", "A", "B", "wrong answer"):
                if f"|| {key}: " in t.prompt:
                    assert field(t.prompt, key) in answers, t.prompt


def test_groups_without_a_boxed_answer_give_no_judge_task():
    def unboxed(rewards):
        return Group(0, "Q?", "gold", ["no box"] * len(rewards), [float(r) for r in rewards])
    for p in (0.0, 1.0):
        for rewards in ([1, 1], [0, 0], [1, 0]):
            assert judge_task(unboxed(rewards), MARKED, RecycleSettings.of(pointwise_prob_mixed=p),
                              random.Random(0)) is None
    assert reflection_task(unboxed([0, 0]), False, MARKED, random.Random(0)) is None


def test_partial_credit_of_one_half_counts_as_correct():
    t = judge_task(Group(0, "Q?", "gold", ["\\boxed{x}"], [0.5]), MARKED, RecycleSettings.of(), random.Random(0))
    assert t.source_correct is True
    assert reflection_task(Group(0, "Q?", "gold", ["\\boxed{x}"], [0.5]), True, MARKED, random.Random(0)) is None


def test_caps_keep_order_and_draw_nothing_when_not_exceeded():
    groups = [hand_group(i, [1, 0]) for i in range(4)]
    rng = random.Random(0)
    tasks = recycle(groups, MARKED, RecycleSettings.of(judge_cap=4, reflection_cap=4), rng)
    assert [t.source_prompt_id for t in tasks] == [0, 1, 2, 3, 0, 1, 2, 3]  # exactly at the cap: group order


def test_queue_push_before_an_episode_says_so():
    with pytest.raises(RuntimeError, match="AuxQueue.push before start_episode"):
        AuxQueue(2).push([])


def test_queue_releases_a_batch_as_soon_as_it_is_full():
    q = AuxQueue(batch_size=2)
    q.start_episode(0)
    q.push(recycle([hand_group(0, [1, 0])], MARKED, RecycleSettings.of(), random.Random(0)))  # 2 tasks
    assert len(q) == 2 and len(q.pop_batch()) == 2 and len(q) == 0


def test_judge_diagnostics_by_hand():
    from megatron_spark.diagnostics import judge_diagnostics

    kinds = ["pointwise", "pointwise", "pairwise", "reflection_ans"]
    labels = ["Yes", "No", "A", "7"]
    lens = [10, 20, 30, 40]
    responses = [["\\boxed{Yes}", "\\boxed{Yes}"],        # label Yes, both say yes: rewards 1, 1 (no gradient)
                 ["\\boxed{Yes}", "\\boxed{no}"],         # label No: 0, 1 (mixed: a gradient)
                 ["\\boxed{B}", "nothing"],               # label A: 0, 0
                 ["\\boxed{7}", "\\boxed{3}"]]
    rewards = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    m = judge_diagnostics(kinds, labels, lens, responses, rewards)
    p = "reward/diag/"
    assert m[p + "judge_share"] == 0.75 and m[p + "reflection_share"] == 0.25
    assert m[p + "judge_prompt_len"] == 20 and m[p + "reflection_prompt_len"] == 40
    assert (m[p + "label_yes"], m[p + "label_no"], m[p + "label_a"], m[p + "label_b"]) == (1 / 3, 1 / 3, 1 / 3, 0)
    assert (m[p + "verdict_yes"], m[p + "verdict_no"], m[p + "verdict_b"], m[p + "verdict_none"]) == \
        (3 / 6, 1 / 6, 1 / 6, 1 / 6)
    assert (m[p + "reward_label_yes"], m[p + "reward_label_no"], m[p + "reward_label_a"]) == (1.0, 0.5, 0.0)
    assert m[p + "judge_groups_with_gradient"] == 1 / 3
    assert judge_diagnostics([], [], [], [], []) == {}


def test_balance_pointwise_keeps_equal_yes_and_no_and_every_pairwise_task():
    # 5 all-wrong groups (No), 2 all-correct (Yes), 3 mixed forced to pairwise: balanced -> 2 Yes, 2 No, 3 pairwise
    groups = ([grp([0, 0], pid=f"w{i}") for i in range(5)] + [grp([1, 1], pid=f"c{i}") for i in range(2)]
              + [grp([1, 0], pid=f"m{i}") for i in range(3)])
    plain = RecycleSettings.of(pointwise_prob_mixed=0.0, reflection_cap=0)
    bal = RecycleSettings.of(pointwise_prob_mixed=0.0, reflection_cap=0, balance_pointwise=True)
    before = recycle(groups, YESNO, plain, random.Random(0))
    assert sorted(t.answer for t in before if t.kind == "pointwise") == ["No"] * 5 + ["Yes"] * 2
    after = recycle(groups, YESNO, bal, random.Random(0))
    assert sorted(t.answer for t in after if t.kind == "pointwise") == ["No", "No", "Yes", "Yes"]
    assert [t.source_prompt_id for t in after if t.kind == "pairwise"] == ["m0", "m1", "m2"]
    ids = [t.source_prompt_id for t in after]
    assert ids == sorted(ids, key=[g.prompt_id for g in groups].index)  # batch order kept
    # no correct answer anywhere: no pointwise task survives (pairwise ones still do)
    only_wrong = recycle([grp([0, 0], pid=i) for i in range(4)], YESNO, bal, random.Random(0))
    assert [t for t in only_wrong if t.kind == "pointwise"] == []
    assert RecycleSettings.of().balance_pointwise is False  # SPARK's behaviour by default
