"""Evaluation without a model: item files and their errors, both math scorers, the reward benchmarks' parsing and
metrics against scores worked out by hand, the results store (resume, settings conflicts, torn lines), the
re-scoring of the released scripts' results, and batched self-reflection against the one-question driver."""
import json
import math

import pytest

from megatron_spark.evaluation import reward_bench as rb
from megatron_spark.evaluation.backends import Reply
from megatron_spark.evaluation.items import EvalInputError, PairItem, RB2Item, load_items
from megatron_spark.evaluation.report import metrics, rescore_released
from megatron_spark.evaluation.runner import ResultStore, pending_items
from megatron_spark.evaluation.scoring import accuracy_table, first_boxed, score_both
from megatron_spark.evaluation.settings import EvalSettings, GenerationSettings
from megatron_spark.reflection import self_reflect, self_reflect_batch


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


# -- items ---------------------------------------------------------------------------------------------------------

def test_spark_items_ids_images_and_duplicates(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    data = [{"dataset": "MathVista", "problem": "1+1?", "answer": "2", "image_path": "img/a.png"},
            {"dataset": "MATH-500", "problem": "2+2?", "answer": "4", "image_path": None},
            {"dataset": "MATH-500", "problem": "2+2?", "answer": "4", "image_path": None}]
    fmt, items = load_items(_write(tmp_path, "b.json", data))
    assert fmt == "spark"
    assert items[0].image_path == str(tmp_path / "img" / "a.png") and items[1].image_path is None
    assert items[2].id == items[1].id + "#1"  # an exact duplicate keeps its own results line
    # the id depends on the content, not the position: a reordered file resumes the same items
    _, again = load_items(_write(tmp_path, "c.json", data[::-1]))
    assert {i.id for i in again} == {i.id for i in items}
    # JSONL too, and an image root
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(d) for d in data[:1]))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "img").mkdir()
    (tmp_path / "root" / "img" / "a.png").write_bytes(b"png")
    _, items = load_items(tmp_path / "b.jsonl", image_root=tmp_path / "root")
    assert items[0].image_path == str(tmp_path / "root" / "img" / "a.png")


@pytest.mark.parametrize("record,fragment", [
    ({"dataset": "MathVista", "problem": "q", "answer": "1", "image_path": "missing.png"},
     "item 0 (MathVista): field 'image_path': image 'missing.png' not found"),
    ({"dataset": "MathVista", "problem": "q", "answer": "  "},
     "item 0 (MathVista): field 'answer' is missing or empty"),
    ({"question": "q", "gold": "1"}, "unknown benchmark format"),
    ({"kind": "pointwise", "question": "q", "answer": "1", "label": "yes"}, "field 'label' is 'yes'"),
    ({"id": "RLAIF-V_1", "query": "q", "response": ["a"], "human_ranking": [0, 1]},
     "field 'response' must be a list of two strings"),
    ({"id": "m-1", "prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "Math"},
     "needs 1 chosen and 3 rejected"),
])
def test_bad_items_name_the_item_and_field(tmp_path, record, fragment):
    with pytest.raises(EvalInputError, match=None) as e:
        load_items(_write(tmp_path, "bad.json", [record]))
    assert fragment in str(e.value)


def test_vlrb_groups_from_ids(tmp_path):
    data = [{"id": i, "query": "<image>\nq", "response": ["a", "b"], "human_ranking": [1, 0]}
            for i in ("RLAIF-V_3", "mathverse_1", "mmmu-pro_2", "wildvision-battle_9")]
    _, items = load_items(_write(tmp_path, "v.json", data), check_images=False)
    assert [i.dataset for i in items] == ["hallucination", "reasoning", "reasoning", "general"]
    assert items[0].query == "q" and items[0].preferred == 1


# -- math scoring --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output,gold,expected", [
    ("first \\boxed{3} then \\boxed{4}", "4", (0.0, 0.0)),     # ours: two different answers score 0
    ("first \\boxed{4} then \\boxed{3}", "4", (0.0, 1.0)),     # ... the released scripts take the first box
    ("so \\boxed{\\frac12}", "\\frac{1}{2}", (1.0, 0.0)),       # bare-string parse fails, exact match fails
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", (1.0, 0.0)),
    ("\\boxed{50\\%}", "0.5", (1.0, 0.0)),
    ("\\boxed{b}", "B", (1.0, 0.0)),
    ("\\box{4}", "4", (1.0, 0.0)),
    ("\\boxed{0.5}", "\\frac{1}{2}", (1.0, 1.0)),
    ("\\boxed{3}", "4", (0.0, 0.0)),
    ("the answer is 4", "4", (0.0, 0.0)),                      # no box: wrong under both
])
def test_ours_and_spark_compat(output, gold, expected):
    assert score_both(output, gold) == expected


def test_first_boxed_is_brace_balanced():
    assert first_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "\\frac{1}{2}"
    assert first_boxed("\\boxed{unclosed") is None and first_boxed("none") is None


def test_accuracy_table_counts_errors_apart_and_macro_averages():
    rows = [{"dataset": "A", "correct": 1.0}, {"dataset": "A", "correct": 0.0, "no_box": True},
            {"dataset": "A", "correct": 0.0, "error": "timeout"}, {"dataset": "B", "correct": 1.0}]
    t = accuracy_table(rows, "correct")
    assert t["datasets"]["A"]["accuracy"] == 0.5 and t["datasets"]["A"]["errors"] == 1
    assert t["macro"] == 0.75 and t["micro"] == pytest.approx(2 / 3) and t["no_box"] == 1 and t["errors"] == 1


@pytest.mark.slow
def test_released_results_rescored_without_the_leak(tmp_path):
    # the released re-scorer kept the previous verdict for an item without an answer: item 1 would count as right
    data = [{"dataset": "D", "problem": "p", "image_path": None, "ground_truth": "4", "vlm_output": "\\boxed{4}",
             "extracted_answer": "4", "is_correct": True},
            {"dataset": "D", "problem": "p", "image_path": None, "ground_truth": "4", "vlm_output": "four",
             "extracted_answer": None, "is_correct": False},
            {"dataset": "E", "problem": "p", "image_path": None, "ground_truth": "\\frac{1}{2}",
             "vlm_output": "\\boxed{\\frac12}", "extracted_answer": "\\frac12", "is_correct": False}]
    recs = rescore_released(_write(tmp_path, "released.json", data), workers=1)
    assert [r["correct"] for r in recs] == [1.0, 0.0, 1.0]
    assert [r["correct_compat"] for r in recs] == [1.0, 0.0, 0.0]
    m = metrics("spark", recs)
    assert m["plain_spark_compat"]["datasets"]["D"]["accuracy"] == 0.5
    assert m["plain_spark_compat"]["macro"] == 0.25 and m["plain"]["macro"] == 0.75


# -- reward benchmarks ---------------------------------------------------------------------------------------------

def test_vlrb_parse():
    assert rb.parse_vlrb("blah\n**Overall Judgment**: Answer 2 is slightly better.") == 2
    assert rb.parse_vlrb("Therefore, Answer 1 is the better one") == 1
    assert rb.parse_vlrb("Overall Judgment: Answer 1 wins") is None
    assert rb.parse_vlrb("Therefore Answer 1 is better") == 1
    assert rb.parse_vlrb("I like answer 1") is None
    assert rb.parse_vlrb_boxed("\\boxed{B}") == 2 and rb.parse_vlrb_boxed("no") is None


def _settings(**kw):
    return EvalSettings(model="m", format=kw.pop("format", "vlrb"), **kw)


def test_vlrb_record_undoes_the_seeded_swap():
    s = _settings(votes=1, swap_seed=7)
    item = PairItem("RLAIF-V_1", "hallucination", "RLAIF-V_1", "q", ("good", "bad"), 0, None)
    req = rb.vlrb_requests(item, s)[0]
    text = req.conversation[-1]["content"][0]["text"]
    good_shown_as = 1 if text.index("good") < text.index("bad") else 2
    rec = rb.vlrb_record(item, [Reply([f"Overall Judgment: Answer {good_shown_as} is better."])], s)
    assert rec["label"] == "agree"
    rec = rb.vlrb_record(item, [Reply([f"Overall Judgment: Answer {3 - good_shown_as} is better."])], s)
    assert rec["label"] == "reject"
    assert rb.vlrb_record(item, [Reply([], "timeout")], s)["error"] == "timeout"
    # the swap is seeded per item: some items are swapped, some not, the same on every run
    texts = [rb.vlrb_requests(PairItem(f"x{i}", "general", "x", "q", ("good", "bad"), 0, None), s)[0]
             .conversation[-1]["content"][0]["text"] for i in range(40)]
    swaps = {t.index("Answer 1: good") > 0 for t in texts if "Answer 1: good" in t} | \
        {False for t in texts if "Answer 1: bad" in t}
    assert swaps == {True, False}


def test_vlrb_votes_and_metrics_by_hand():
    # k=3: 2 of 3 agree -> agree; 1 agree, 1 reject, 1 unparsed -> unsure
    assert rb._vote_label(["agree", "agree", "reject"]) == "agree"
    assert rb._vote_label(["agree", "reject", None]) == "unsure"
    recs = ([{"dataset": "hallucination", "source": "RLAIF-V", "label": "agree"}] * 3
            + [{"dataset": "hallucination", "source": "RLAIF-V", "label": "reject"}]
            + [{"dataset": "reasoning", "source": "mathverse", "label": "agree"},
               {"dataset": "reasoning", "source": "mathverse", "label": "unsure"},
               {"dataset": "reasoning", "source": "mmmu-pro", "label": "reject"},
               {"dataset": "general", "source": "wildvision", "label": "reject"},
               {"dataset": "general", "source": "wildvision", "label": "agree", "error": "HTTP 500"}])
    m = rb.vlrb_metrics(recs)
    # hallucination 3/4, reasoning 1/2 (unsure leaves the denominator), general 0/1 (the error is not scored)
    assert m["groups"] == {"general": 0.0, "hallucination": 0.75, "reasoning": 0.5}
    assert m["overall"] == pytest.approx(4 / 7)
    assert m["macro"] == pytest.approx((0 + 0.75 + 0.5) / 3)
    assert m["strict"] == pytest.approx(4 / 8)
    assert m["mathverse"] == 1.0 and m["errors"] == 1


def test_rb2_four_way_by_hand():
    s = _settings(format="rb2", swap_seed=3)
    item = RB2Item("m-1", "Math", "p", ("right",), ("w1", "w2", "w3"), 1)
    slot = "ABCD"[rb.rb2_slot(item, 3)]
    text = rb.rb2_requests(item, s)[0].conversation[-1]["content"][-1]["text"]
    assert f"[The Start of Assistant {slot}'s Answer]\nright" in text
    other = next(x for x in "ABCD" if x != slot)
    assert rb.rb2_record(item, [Reply([f"... [[{slot}]]"])], s)["score"] == 1.0
    assert rb.rb2_record(item, [Reply([f"... [[{other}]]"])], s)["score"] == 0.0
    assert rb.rb2_record(item, [Reply(["no verdict"])], s)["score"] == 0.25
    assert rb.rb2_record(item, [Reply([f"[[{slot}]] or [[{other}]]"])], s)["score"] == 0.25
    assert rb.rb2_record(item, [Reply([f"\\boxed{{{slot}}}"])], s)["score_boxed"] == 1.0
    assert rb.parse_rating("... so [[7]]") == 7 and rb.parse_rating("Rating: 9") == 9
    assert rb.parse_rating("[[11]]") == -1 and rb.parse_rating("none") == -1


def test_ties_score_by_hand():
    # prompt 1: ref (1 correct) ratings [9 | 5, 4], tied (2 correct) ratings [8, 7 | 6]
    #   ref accurate, tied accurate; tied margin = 7 - 6 = 1, spread = 8 - 7 = 1, ref margin = 9 - 5 = 4
    #   preferred: 1 > 1 false; hard: min(4, 1) = 1 > 1 false; margin term tanh(1/1 - 1) = 0
    # prompt 2: ref [6 | 7] (not accurate, margin -1), tied [9, 5 | 2] (accurate, margin 3, spread 4)
    #   preferred: 3 > 4 false; hard false; margin term tanh(min(-1, 3) / 4 - 1) = tanh(-1.25)
    recs = [{"id": "ref:1", "dataset": "Ties", "ratings": [9, 5, 4], "num_correct": 1},
            {"id": "tied:1", "dataset": "Ties", "ratings": [8, 7, 6], "num_correct": 2},
            {"id": "ref:2", "dataset": "Ties", "ratings": [6, 7], "num_correct": 1},
            {"id": "tied:2", "dataset": "Ties", "ratings": [9, 5, 2], "num_correct": 2}]
    expected = 0.3 * 1.0 + 0.3 * 0.5 + 0.2 * 0 + 0.2 * 0 + 0.01 * (0 + math.tanh(-1.25)) / 2
    assert rb.ties_score(recs) == pytest.approx(expected)
    # now make prompt 2's tied margin beat its spread: ratings [9, 8 | 2] -> margin 6 > spread 1
    recs[3] = {"id": "tied:2", "dataset": "Ties", "ratings": [9, 8, 2], "num_correct": 2}
    expected = 0.3 + 0.15 + 0.2 * 0.5 + 0.2 * 0 + 0.01 * (0 + math.tanh(-1 / 1 - 1)) / 2
    assert rb.ties_score(recs) == pytest.approx(expected)


def test_rb2_metrics_mean_of_subsets():
    recs = [{"id": "a", "dataset": "Math", "score": 1.0}, {"id": "b", "dataset": "Math", "score": 0.25},
            {"id": "c", "dataset": "Focus", "score": 0.0},
            {"id": "ref:1", "dataset": "Ties", "ratings": [9, 1], "num_correct": 1}]
    m = rb.rb2_metrics(recs)
    assert m["subsets"]["Math"] == 0.625 and m["math"] == 0.625
    assert m["subsets"]["Ties"] == pytest.approx(0.3)  # ref accurate, no tied prompts
    assert m["mean"] == pytest.approx((0.625 + 0 + 0.3) / 3) and not m["complete"]


def test_judge_metrics_by_label():
    recs = [{"dataset": "judge/pointwise", "label": "Yes", "correct": 1.0},
            {"dataset": "judge/pointwise", "label": "No", "correct": 0.0},
            {"dataset": "judge/pairwise", "label": "A", "correct": 1.0}]
    m = rb.judge_metrics(recs)
    assert m["datasets"]["judge/pointwise"]["accuracy"] == 0.5 and m["by_label"] == {"A": 1.0, "No": 0.0, "Yes": 1.0}


# -- results store -------------------------------------------------------------------------------------------------

def test_store_resumes_and_refuses_other_settings(tmp_path):
    s = _settings(format="spark")
    store = ResultStore(tmp_path / "out", s)
    store.append([{"id": "a", "x": 1}, {"id": "b", "error": "timeout"}])
    # a torn last line (killed mid-write) is dropped and redone
    with open(store.path, "a") as f:
        f.write('{"id": "c", "x"')
    store = ResultStore(tmp_path / "out", s)
    assert store.done() == {"a"}  # b errored: it runs again
    store.append([{"id": "b", "x": 2}])
    assert store.done() == {"a", "b"} and store.records()["b"]["x"] == 2

    other = _settings(format="spark", generation=GenerationSettings(max_tokens=512))
    with pytest.raises(EvalInputError, match=r"generation.max_tokens: 2048 -> 512"):
        ResultStore(tmp_path / "out", other)
    forced = ResultStore(tmp_path / "out", other, force=True)
    assert forced.done() == set()


def test_shards_split_the_pending_items():
    class It:
        def __init__(self, i):
            self.id = str(i)
    items = [It(i) for i in range(7)]
    shares = [pending_items(items, {"0"}, k, 3) for k in range(3)]
    assert sorted(i.id for s in shares for i in s) == [str(i) for i in range(1, 7)]
    # a shard that starts late, after another finished items, still takes only its own
    # (items 0 and 1 done by the time shard 1 starts: it takes 4 only; splitting the pending list would give 3, 6)
    assert [i.id for i in pending_items(items, {"0", "1"}, 1, 3)] == ["4"]


# -- self-reflection -----------------------------------------------------------------------------------------------

def test_batched_reflection_makes_the_same_calls_as_one_by_one():
    def model(prompt, image):  # a deterministic stand-in: answers depend on the prompt
        if prompt.endswith("Your judgement:"):
            return "\\boxed{Yes}" if prompt.endswith("answer:\n7\n\nYour judgement:") else "\\boxed{No}"
        if "incorrect" in prompt.lower():
            return "fixed \\boxed{7}"
        return {"q1": "\\boxed{7}", "q2": "\\boxed{3}", "q3": "no box"}[prompt.split("\n")[0]]
    questions = ["q1", "q2", "q3"]
    one = [self_reflect(model, q, None) for q in questions]
    batch_calls = []

    def batch(prompts, images):
        batch_calls.append(len(prompts))
        return [model(p, i) for p, i in zip(prompts, images)]
    many = self_reflect_batch(batch, questions, [None] * 3)
    assert [t.calls for t in many] == [t.calls for t in one]
    assert [t.answer for t in many] == ["7", "7", "7"]
    assert [t.first_answer for t in many] == ["7", "3", None]
    assert many[0].accepted and many[0].rounds == 1 and many[1].rounds == 2
    assert batch_calls[0] == 3  # every question's first call in one batch
