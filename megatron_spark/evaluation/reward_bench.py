"""The model as a judge: VL-RewardBench, RewardBench 2 and held-out recycled SPARK judge tasks.

Each benchmark is three pure functions: the requests an item needs (`*_requests`), the per-item record made from
the replies (`*_record`, raw outputs kept so a different parse can be reported later), and the aggregate metrics
(`*_metrics`). The prompts below are our own wording with the benchmarks' verdict formats ("Overall Judgment:
Answer X is better." for VL-RewardBench, `[[A]]`..`[[D]]` and `[[rating]]` for RewardBench 2); to compare with
published numbers pass the benchmark's official prompt with `--judge-prompt FILE` (same placeholders).

Metrics follow the benchmarks' own definitions:
- VL-RewardBench: each of k votes picks an answer (the order of the two is swapped by a seeded coin per vote);
  an item agrees when more than half the votes pick the human-preferred answer, rejects when more than half pick
  the other, else it is unsure. Accuracy = agree / (agree + reject) per group (general, hallucination,
  reasoning); overall = the same pooled over groups; macro = mean over groups; "strict" also counts unsure items
  as wrong. The MathVerse items (id prefix mathverse) are reported as their own subset.
- RewardBench 2: the chosen answer goes to a seeded slot among four; 1 if the verdict names it, 0 if another,
  0.25 if no verdict can be read. Ties is scored from 1-10 ratings of every candidate by the weighted formula of
  the benchmark (see `ties_score`). The leaderboard number is the mean of the six subset scores.
"""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from megatron_spark.evaluation.backends import Conversation, Reply, conversation
from megatron_spark.evaluation.items import JudgeItem, PairItem, RB2Item, RB2_SUBSETS
from megatron_spark.evaluation.settings import EvalSettings
from megatron_spark.judging import POSITIVE, JudgeOutcome, judge_report, verdict_of
from megatron_spark.kinds import TaskKind
from megatron_spark.reward import boxed_answer, extract_boxed, normalize
from megatron_spark.templates import TemplateBank

VLRB_PROMPT = (
    "You are judging two answers to a question about an image. Check each answer against the image and the "
    "question: is it accurate, does it mention only what is really there (no invented objects, attributes or "
    "text), is its reasoning sound, and does it help the person asking? Compare the two answers on these points, "
    "then finish with one line of the form 'Overall Judgment: Answer X is better.' where X is 1 or 2.\n\n"
    "Question: {query}\nAnswer 1: {answer1}\nAnswer 2: {answer2}")
RB2_SYSTEM = (
    "You will see a user's question and the answers of four assistants. Decide which answer serves the user best: "
    "it follows the user's instructions and is correct, helpful, relevant and complete where that matters. Do not "
    "let the order of the answers, their length or the assistants' names sway you. Compare them briefly, then give "
    "your verdict as [[A]], [[B]], [[C]] or [[D]].")
RB2_RATING = (
    "Rate how well the answer below responds to the user's question, from 1 (useless or wrong) to 10 (correct and "
    "fully helpful). Correctness comes first; answers that are equally correct deserve the same rating whatever "
    "their length or level of detail. Explain briefly, then give the rating as [[N]].\n\n"
    "[Question]\n{prompt}\n\n[Answer]\n{answer}")
_SLOTS = "ABCD"
_FIELD = re.compile(r"\{(query|answer1|answer2|prompt|answer|answer_[a-d])\}")


def render(template: str, **fields: str) -> str:
    """Fill {query}, {answer1}, ...; other braces (e.g. LaTeX in a response) are left alone."""
    return _FIELD.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


@dataclass
class Request:
    conversation: Conversation
    n: int = 1
    temperature: Optional[float] = None   # None: the settings' (greedy by default)
    role: str = ""                        # what the reply is for, where an item asks several things
    key: str = ""                         # sets apart the sampling seeds of requests with the same conversation


def _coin(seed: int, *key) -> random.Random:
    return random.Random(f"{seed}:" + ":".join(map(str, key)))


# -- VL-RewardBench ------------------------------------------------------------------------------------------------

_VLRB_VERDICT = re.compile(r"(?:Overall Judgment|Therefore)\s*.*\s*-*\s*Answer\s*(\d+)\s*is\s*(?:the\s*)?"
                           r"(?:slightly\s*)?better", re.IGNORECASE)


def parse_vlrb(text: str) -> Optional[int]:
    """1 or 2 from "Overall Judgment: Answer X is better" (newlines and '*' removed first, as the benchmark does);
    None when it does not match."""
    m = _VLRB_VERDICT.search((text or "").replace("\n", "").replace("*", ""))
    return int(m.group(1)) if m and m.group(1) in ("1", "2") else None


def parse_vlrb_boxed(text: str) -> Optional[int]:
    """The re-parse for judges trained to box their verdict: \\boxed{1|2|A|B}."""
    v = boxed_answer(text or "")
    v = normalize(v).upper() if v else None
    return {"1": 1, "A": 1, "2": 2, "B": 2}.get(v or "")


def vlrb_requests(item: PairItem, s: EvalSettings, prompt: Optional[str] = None) -> list[Request]:
    reqs = []
    for v in range(s.votes):
        swap = _coin(s.swap_seed, item.id, v).random() < 0.5
        a1, a2 = item.responses[::-1] if swap else item.responses
        text = render(prompt or VLRB_PROMPT, query=item.query, answer1=a1, answer2=a2)
        # the benchmark sends the text before the image, with no system prompt
        conv = conversation(text, item.image_path, None, image_first=False)
        reqs.append(Request(conv, 1, None if s.votes == 1 else s.vote_temperature, key=f"vote{v}"))
    return reqs


def _vote_label(picks: list[Optional[str]]) -> str:
    k = len(picks)
    agree, reject = picks.count("agree"), picks.count("reject")
    return "agree" if agree > k / 2 else "reject" if reject > k / 2 else "unsure"


def vlrb_record(item: PairItem, replies: list[Reply], s: EvalSettings) -> dict:
    outputs, picks, boxed_picks = [], [], []
    for v, reply in enumerate(replies):
        swap = _coin(s.swap_seed, item.id, v).random() < 0.5
        text = reply.texts[0] if reply.texts else ""
        outputs.append(text)
        for parse, into in ((parse_vlrb, picks), (parse_vlrb_boxed, boxed_picks)):
            shown = parse(text)
            if shown is None or reply.error:
                into.append(None)
                continue
            picked = (shown - 1) ^ int(swap)  # index into item.responses
            into.append("agree" if picked == item.preferred else "reject")
    error = next((r.error for r in replies if r.error), None)
    return {"id": item.id, "dataset": item.dataset, "source": item.source, "outputs": outputs,
            "votes": picks, "label": _vote_label(picks), "label_boxed": _vote_label(boxed_picks), "error": error}


def vlrb_metrics(records: list[dict], label_key: str = "label") -> dict:
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"agree": 0, "reject": 0, "unsure": 0})
    for r in records:
        if r.get("error"):
            continue
        groups[r["dataset"]][r[label_key]] += 1
        if r["source"].lower().startswith("mathverse"):
            groups["mathverse"][r[label_key]] += 1

    def acc(c: dict) -> Optional[float]:
        return c["agree"] / (c["agree"] + c["reject"]) if c["agree"] + c["reject"] else None

    main = {g: c for g, c in groups.items() if g != "mathverse"}
    pooled = {k: sum(c[k] for c in main.values()) for k in ("agree", "reject", "unsure")}
    per_group = {g: acc(c) for g, c in sorted(main.items())}
    present = [a for a in per_group.values() if a is not None]
    total = sum(pooled.values())
    return {"overall": acc(pooled), "macro": sum(present) / len(present) if present else None,
            "strict": pooled["agree"] / total if total else None, "groups": per_group,
            "mathverse": acc(groups["mathverse"]) if "mathverse" in groups else None,
            "counts": {g: dict(c) for g, c in sorted(groups.items())},
            "errors": sum(1 for r in records if r.get("error"))}


# -- RewardBench 2 -------------------------------------------------------------------------------------------------

def rb2_slot(item: RB2Item, seed: int) -> int:
    return _coin(seed, item.id).randrange(4)


def parse_rb2(text: str) -> Optional[str]:
    """The verdict letter of [[A]]..[[D]]; None when absent or when several different letters appear."""
    found = set(re.findall(r"\[\[([ABCD])\]\]", text or ""))
    return found.pop() if len(found) == 1 else None


def parse_rating(text: str) -> int:
    """A 1-10 rating: the last [[N]], else a trailing integer; -1 when there is none."""
    found = re.findall(r"\[\[(\d+)\]\]", text or "") or re.findall(r"(\d+)\s*\W*$", text or "")
    if found and 1 <= int(found[-1]) <= 10:
        return int(found[-1])
    return -1


def rb2_requests(item: RB2Item, s: EvalSettings, prompt: Optional[str] = None) -> list[Request]:
    if item.dataset == "Ties":
        return [Request(conversation(render(RB2_RATING, prompt=item.prompt, answer=a), None, None))
                for a in item.chosen + item.rejected]
    slot = rb2_slot(item, s.swap_seed)
    answers = list(item.rejected)
    answers.insert(slot, item.chosen[0])
    body = f"[User Question]\n{item.prompt}\n\n" + "\n\n".join(
        f"[The Start of Assistant {_SLOTS[i]}'s Answer]\n{a}\n[The End of Assistant {_SLOTS[i]}'s Answer]"
        for i, a in enumerate(answers))
    if prompt:  # a user-supplied prompt gets the fields instead of our layout
        body = render(prompt, prompt=item.prompt, **{f"answer_{_SLOTS[i].lower()}": a for i, a in enumerate(answers)})
        return [Request(conversation(body, None, None))]
    return [Request(conversation(body, None, RB2_SYSTEM))]


def rb2_record(item: RB2Item, replies: list[Reply], s: EvalSettings) -> dict:
    outputs = [r.texts[0] if r.texts else "" for r in replies]
    error = next((r.error for r in replies if r.error), None)
    rec = {"id": item.id, "dataset": item.dataset, "outputs": outputs, "error": error}
    if item.dataset == "Ties":
        rec.update(ratings=[parse_rating(o) for o in outputs], num_correct=item.num_correct)
        return rec
    slot = _SLOTS[rb2_slot(item, s.swap_seed)]
    verdict = parse_rb2(outputs[0])
    boxed = boxed_answer(outputs[0])
    boxed = normalize(boxed).upper() if boxed else None
    rec.update(slot=slot, verdict=verdict, score=0.25 if verdict is None else float(verdict == slot),
               score_boxed=0.25 if boxed not in tuple(_SLOTS) else float(boxed == slot))
    return rec


def _prompt_stats(ratings: list[int], num_correct: int) -> tuple[bool, Optional[float], float]:
    correct, wrong = ratings[:num_correct], ratings[num_correct:]
    accurate = bool(wrong) and min(correct) > max(wrong)
    spread = float(max(correct) - min(correct)) if len(correct) > 1 else None
    return accurate, spread, float(min(correct) - max(wrong)) if wrong else 0.0


def ties_score(records: list[dict]) -> Optional[float]:
    """RewardBench 2's Ties score from per-candidate ratings (the first `num_correct` candidates are correct).
    Items are `ref:N` (one correct answer) and `tied:N` (several). Per prompt: accurate = every correct answer
    rated above every wrong one; margin = lowest correct - highest wrong; spread = highest - lowest correct.
    Score = 0.3 tied accuracy + 0.3 ref accuracy + 0.2 P(tied margin > spread) + 0.2 P(min(ref, tied margin) >
    spread) + 0.01 mean tanh(min margin / spread - 1) (0 where the spread is 0), over prompts present as both."""
    stats: dict[str, dict[str, tuple]] = {"ref": {}, "tied": {}}
    for r in records:
        if r.get("error") or r["dataset"] != "Ties":
            continue
        kind, _, pid = r["id"].partition(":")
        if kind in stats:
            stats[kind][pid] = _prompt_stats(r["ratings"], r["num_correct"])
    if not stats["ref"] and not stats["tied"]:
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    ref_acc = mean([float(s[0]) for s in stats["ref"].values()])
    tied_acc = mean([float(s[0]) for s in stats["tied"].values()])
    shared = sorted(set(stats["ref"]) & set(stats["tied"]))
    if not shared:
        return 0.3 * tied_acc + 0.3 * ref_acc
    pref, hard, margin = [], [], []
    for pid in shared:
        spread = stats["tied"][pid][1] or 0.0
        m_tied, m_ref = stats["tied"][pid][2], stats["ref"][pid][2]
        pref.append(float(m_tied > spread))
        hard.append(float(min(m_ref, m_tied) > spread))
        margin.append(math.tanh(min(m_ref, m_tied) / spread - 1) if spread > 0 else 0.0)
    return 0.3 * tied_acc + 0.3 * ref_acc + 0.2 * mean(pref) + 0.2 * mean(hard) + 0.01 * mean(margin)


def rb2_metrics(records: list[dict], score_key: str = "score") -> dict:
    per: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if not r.get("error") and r["dataset"] != "Ties":
            per[r["dataset"]].append(r[score_key])
    subsets: dict[str, Optional[float]] = {k: sum(v) / len(v) for k, v in per.items()}
    ties = ties_score(records)
    if ties is not None:
        subsets["Ties"] = ties
    ordered = {k: subsets[k] for k in RB2_SUBSETS if k in subsets}
    ordered.update({k: v for k, v in subsets.items() if k not in ordered})
    present = [v for v in ordered.values() if v is not None]
    return {"subsets": ordered, "mean": sum(present) / len(present) if present else None,
            "math": ordered.get("Math"), "complete": all(k in ordered for k in RB2_SUBSETS),
            "errors": sum(1 for r in records if r.get("error"))}


# -- recycled SPARK judge tasks -----------------------------------------------------------------------------------

def judge_requests(item: JudgeItem, s: EvalSettings, bank: TemplateBank) -> list[Request]:
    """The verdict (greedy), `s.votes` sampled verdicts when k > 1 (the judge's AUROC), and, for items that name
    their question's gold answer, the question itself (greedy: does the model solve what it judges?). The judge
    prompt is the one training builds for the same task (the bank's evaluation template, same fields)."""
    kind = item.dataset.split("/")[1]
    t = bank.judge_templates()[kind]
    fields = {"answer": item.answers[0]} if kind == TaskKind.POINTWISE else \
        {"answer_a": item.answers[0], "answer_b": item.answers[1]}
    g = s.generation
    conv = conversation(t.render(question=item.question, **fields), item.image_path, g.system_prompt)
    reqs = [Request(conv, role="verdict")]
    if s.votes > 1:
        reqs.append(Request(conv, s.votes, s.vote_temperature, role="votes"))
    if item.gold is not None:
        question = f"{item.question.rstrip()}\n{g.suffix}" if g.suffix else item.question
        reqs.append(Request(conversation(question, item.image_path, g.system_prompt), role="solve"))
    return reqs


def judge_record(item: JudgeItem, reqs: list[Request], replies: list[Reply], s: EvalSettings,
                 solved: Optional[bool] = None) -> dict:
    by_role = {r.role: rep for r, rep in zip(reqs, replies)}
    out = by_role["verdict"].texts[0] if by_role["verdict"].texts else ""
    verdict = verdict_of(out)
    votes = [verdict_of(x) for x in by_role["votes"].texts] if "votes" in by_role else []
    return {"id": item.id, "dataset": item.dataset, "output": out, "verdict": verdict, "votes": votes,
            "label": item.label, "correct": float(verdict == item.label.lower()), "no_box": extract_boxed(out) is None,
            "solved": solved, "error": next((r.error for r in replies if r.error), None)}


def judge_outcome(r: dict) -> JudgeOutcome:
    kind = r["dataset"].split("/")[1]
    positive = POSITIVE["yesno" if r["label"] in ("Yes", "No") else "ab"]
    return JudgeOutcome(kind, r["label"], positive, r.get("verdict"), tuple(r.get("votes") or ()), r.get("solved"))


def judge_metrics(records: list[dict]) -> dict:
    """Accuracy per kind and per label (a judge that always says Yes scores 0.5 on balanced labels and 1.0 on the
    Yes half: both are shown), and the judge report (`judging.judge_report`: AUROC from the votes, vote accuracy,
    the solve-to-judge gap), pooled and per kind."""
    from megatron_spark.evaluation.scoring import accuracy_table

    ok = [r for r in records if not r.get("error")]
    table = accuracy_table(records, "correct")
    by_label: dict[str, list[float]] = defaultdict(list)
    for r in ok:
        by_label[r["label"]].append(r["correct"])
    table["by_label"] = {k: sum(v) / len(v) for k, v in sorted(by_label.items())}
    table["report"] = judge_report([judge_outcome(r) for r in ok])
    return table
