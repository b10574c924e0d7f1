"""Benchmark files -> typed items, checked before any model is loaded.

Formats (detected from the first item's fields, or forced with `--format`):
- `spark`: the released Spark benchmark files, a JSON list (or JSONL) of `{dataset, problem, answer, image_path}`;
  `image_path` may be relative to `--image-root` (else to the file) and null for text items.
- `vlrb`: VL-RewardBench, `{id, query, response: [r1, r2], human_ranking, image_path}`; `human_ranking[0] == 0`
  means the first response is preferred. The group (general / hallucination / reasoning) comes from the id prefix.
- `rb2`: RewardBench 2, `{id, prompt, chosen: [...], rejected: [...], subset, num_correct}`, text only.
- `judge`: recycled SPARK judge tasks with balanced labels, `{kind: pointwise|pairwise, question, answer` or
  `answer_a, answer_b, label, image_path}`.

Every item gets a stable id: its `id` field, else a hash of dataset + problem + image path, so a resumed run
recognises finished items whatever their order in the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from megatron_spark.kinds import TaskKind

FORMATS = ("spark", "vlrb", "rb2", "judge")
_SIGNATURES = {"spark": ("problem", "answer"), "vlrb": ("query", "response", "human_ranking"),
               "rb2": ("prompt", "chosen", "rejected"), "judge": ("kind", "question", "label")}
RB2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")


class EvalInputError(ValueError):
    """A bad benchmark file or item: the message names the item and the field, and the fix."""


@dataclass(frozen=True)
class MathItem:
    id: str
    dataset: str
    problem: str
    answer: str
    image_path: Optional[str]


@dataclass(frozen=True)
class PairItem:
    """VL-RewardBench: which of two responses is better."""
    id: str
    dataset: str            # its group: general | hallucination | reasoning
    source: str             # id prefix, e.g. mathverse, wildvision, RLAIF-V
    query: str
    responses: tuple[str, str]
    preferred: int          # 0 or 1
    image_path: Optional[str]


@dataclass(frozen=True)
class RB2Item:
    id: str
    dataset: str            # its subset
    prompt: str
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    num_correct: int
    image_path: Optional[str] = None


@dataclass(frozen=True)
class JudgeItem:
    id: str
    dataset: str            # judge/pointwise | judge/pairwise
    question: str
    answers: tuple[str, ...]
    label: str              # Yes/No (pointwise) or A/B (pairwise)
    image_path: Optional[str]
    gold: Optional[str] = None   # the question's right answer, when the file gives it (the solve-to-judge gap)


Item = Union[MathItem, PairItem, RB2Item, JudgeItem]


def stable_id(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join("" if p is None else str(p) for p in parts).encode()).hexdigest()[:16]


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalInputError(f"benchmark file '{path}' does not exist")
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); give a JSON list or a .jsonl "
                             f"file") from None
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def detect_format(first: dict, path: Path) -> str:
    for fmt, keys in _SIGNATURES.items():
        if all(k in first for k in keys):
            return fmt
    raise EvalInputError(f"{path}: unknown benchmark format (item 0 has fields {sorted(first)}); expected one of: "
                         + "; ".join(f"{f} with {', '.join(k)}" for f, k in _SIGNATURES.items())
                         + " (or pass --format)")


class _Loader:
    def __init__(self, path: Path, image_root: Optional[Path], check_images: bool):
        self.path, self.root, self.check_images = path, image_root or path.parent, check_images

    def where(self, i: int, rec: dict) -> str:
        tag = rec.get("id") or rec.get("dataset") or rec.get("subset")
        return f"{self.path} item {i}" + (f" ({tag})" if tag else "")

    def text(self, i: int, rec: dict, key: str, allow_empty: bool = False) -> str:
        v = rec.get(key)
        if v is None or not isinstance(v, (str, int, float)) or (not allow_empty and not str(v).strip()):
            raise EvalInputError(f"{self.where(i, rec)}: field '{key}' is missing or empty; every item needs it")
        return str(v)

    def image(self, i: int, rec: dict, key: str = "image_path") -> Optional[str]:
        v = rec.get(key)
        if v in (None, ""):
            return None
        p = Path(v)
        p = p if p.is_absolute() else self.root / p
        if self.check_images and not p.is_file():
            raise EvalInputError(f"{self.where(i, rec)}: field '{key}': image '{v}' not found (looked for {p}); "
                                 f"set --image-root to the folder the paths are relative to")
        return str(p)


def _vlrb_group(source: str) -> str:
    s = source.lower()
    if s.startswith(("rlaif", "rlhf", "hallucination", "povid")):
        return "hallucination"
    if s.startswith(("mathverse", "mmmu")):
        return "reasoning"
    return "general"


def load_items(path: str | Path, fmt: Optional[str] = None, image_root: Optional[str | Path] = None,
               check_images: bool = True, limit: Optional[int] = None) -> tuple[str, list[Item]]:
    """Read and validate a whole benchmark file; returns (format, items). Raises EvalInputError on the first bad
    item, before any work starts."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise EvalInputError(f"{path}: the file holds no items")
    if fmt is not None and fmt not in FORMATS:
        raise EvalInputError(f"--format '{fmt}' is unknown; use one of {', '.join(FORMATS)}")
    if not isinstance(records[0], dict):
        raise EvalInputError(f"{path} item 0: expected an object, got {type(records[0]).__name__}")
    fmt = fmt or detect_format(records[0], path)
    ld = _Loader(path, Path(image_root) if image_root else None, check_images)
    items: list[Item] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records[:limit] if limit else records):
        if not isinstance(rec, dict):
            raise EvalInputError(f"{path} item {i}: expected an object, got {type(rec).__name__}")
        item = _parse(fmt, i, rec, ld)
        n = seen.get(item.id, 0)
        seen[item.id] = n + 1
        if n:  # an exact duplicate keeps its own results line
            item = type(item)(**{**item.__dict__, "id": f"{item.id}#{n}"})
        items.append(item)
    return fmt, items


def _parse(fmt: str, i: int, rec: dict, ld: _Loader) -> Item:
    if fmt == "spark":
        dataset, problem = ld.text(i, rec, "dataset"), ld.text(i, rec, "problem")
        answer = ld.text(i, rec, "answer")
        image = ld.image(i, rec)
        return MathItem(str(rec.get("id") or stable_id(dataset, problem, rec.get("image_path"))), dataset, problem,
                        answer, image)
    if fmt == "vlrb":
        item_id = ld.text(i, rec, "id")
        responses = rec.get("response")
        if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            raise EvalInputError(f"{ld.where(i, rec)}: field 'response' must be a list of two strings")
        ranking = rec.get("human_ranking")
        if not (isinstance(ranking, list) and sorted(ranking) == [0, 1]):
            raise EvalInputError(f"{ld.where(i, rec)}: field 'human_ranking' must be [0, 1] or [1, 0]")
        source = str(rec.get("query_source") or item_id.split("-")[0].split("_")[0])
        return PairItem(item_id, _vlrb_group(item_id if rec.get("query_source") is None else source), source,
                        ld.text(i, rec, "query").replace("<image>\n", "").replace("<image>", ""),
                        (responses[0], responses[1]), ranking.index(0), ld.image(i, rec))
    if fmt == "rb2":
        item_id, subset = ld.text(i, rec, "id"), ld.text(i, rec, "subset")
        chosen, rejected = rec.get("chosen"), rec.get("rejected")
        for key, v in (("chosen", chosen), ("rejected", rejected)):
            if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
                raise EvalInputError(f"{ld.where(i, rec)}: field '{key}' must be a non-empty list of strings")
        if subset != "Ties" and (len(chosen) != 1 or len(rejected) != 3):
            raise EvalInputError(f"{ld.where(i, rec)}: a {subset} item needs 1 chosen and 3 rejected responses "
                                 f"(best-of-4), got {len(chosen)} and {len(rejected)}")
        return RB2Item(item_id, subset, ld.text(i, rec, "prompt"), tuple(chosen), tuple(rejected),
                       int(rec.get("num_correct") or len(chosen)))
    # judge
    kind = ld.text(i, rec, "kind")
    if kind not in (TaskKind.POINTWISE, TaskKind.PAIRWISE):
        raise EvalInputError(f"{ld.where(i, rec)}: field 'kind' is '{kind}'; use pointwise or pairwise")
    keys = ("answer",) if kind == TaskKind.POINTWISE else ("answer_a", "answer_b")
    answers = tuple(ld.text(i, rec, k) for k in keys)
    label = ld.text(i, rec, "label")
    allowed = ("Yes", "No") if kind == TaskKind.POINTWISE else ("A", "B")
    if label not in allowed:
        raise EvalInputError(f"{ld.where(i, rec)}: field 'label' is '{label}'; a {kind} task's label is "
                             f"{' or '.join(allowed)}")
    question = ld.text(i, rec, "question")
    gold = rec.get("gold")
    return JudgeItem(str(rec.get("id") or stable_id(kind, question, *answers, rec.get("image_path"))),
                     f"judge/{kind}", question, answers, label, ld.image(i, rec),
                     None if gold is None else str(gold))
