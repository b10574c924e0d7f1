"""Math answers scored two ways, and per-dataset accuracy.

- **ours** (the trainer's reward, `megatron_spark.reward.score`): the boxed answer (two different boxed answers
  score 0, as SPARK's reference verifier reads them as one set), math-verify with the gold first and wrapped in
  `$...$`, labels compared case-insensitively, a normalised string comparison as fallback.
- **spark-compat** (the released Spark evaluation scripts): the FIRST `\\boxed{}`, math-verify called with the
  prediction first and both as bare strings, then exact string equality. Measured differences (ours / compat):
  first box 4 then box 3 for gold 4 (0 / 1); `\\frac12`, `\\dfrac{1}{2}` for `\\frac{1}{2}` (1 / 0: bare
  strings parse to nothing and exact match fails); `50\\%` for 0.5, `\\text{B}` or `b` for B, `\\box{4}` for 4
  (1 / 0). `0.5`, `1/2` and `\\frac{1}{2}` for `\\frac{1}{2}` agree. A missing box is wrong under both (the
  released re-scorer instead kept the previous item's verdict: that bug is not reproduced).

Both are computed for every item (in a `RewardPool`, so a pathological answer costs at most the time limit) and
stored side by side; `--spark-compat` only picks which one the report leads with.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Optional

from megatron_spark.reward import VerifierConfig, brace_group, check, score


def first_boxed(text: str) -> Optional[str]:
    """The content of the first brace-balanced `\\boxed{...}` (the released scripts' extraction), or None."""
    m = re.search(r"\\boxed\s*\{", text or "")
    if not m:
        return None
    got = brace_group(text, m.end() - 1)
    return got[0] if got else None


def spark_compat_check(pred: Optional[str], gold: str) -> bool:
    if pred is None:
        return False
    try:
        from math_verify import parse, verify

        if verify(parse(pred, parsing_timeout=None), parse(gold, parsing_timeout=None), timeout_seconds=None):
            return True
    except Exception:  # noqa: BLE001 - a parser crash is a wrong answer, never a crashed run
        pass
    return pred == gold


def score_both(output: str, gold: str, cfg: VerifierConfig = VerifierConfig()) -> tuple[float, float]:
    """(ours, spark-compat) 0/1 scores of one model output; a RewardPool scorer (`fn=...:score_both`)."""
    ours = score(output or "", gold, cfg)  # exactly the training reward
    return ours, float(spark_compat_check(first_boxed(output or ""), gold))


def score_extracted(pred: Optional[str], gold: str, cfg: VerifierConfig = VerifierConfig()) -> tuple[float, float]:
    """(ours, spark-compat) for an already extracted answer (re-scoring the released scripts' results files)."""
    return float(check(pred, gold, cfg)), float(spark_compat_check(pred, gold))


SCORE_BOTH = "megatron_spark.evaluation.scoring:score_both"
SCORE_EXTRACTED = "megatron_spark.evaluation.scoring:score_extracted"


def accuracy_table(rows: Iterable[dict], key: str) -> dict:
    """Per-dataset accuracy of `key` (1/0 per row) over rows without errors; the unweighted mean over datasets
    (the papers' "average") and the pooled mean; the counts of errors and missing boxes per dataset."""
    per: dict[str, dict] = defaultdict(lambda: {"correct": 0.0, "scored": 0, "errors": 0, "no_box": 0})
    for r in rows:
        d = per[r["dataset"]]
        if r.get("error"):
            d["errors"] += 1
            continue
        d["scored"] += 1
        d["correct"] += float(r[key])
        d["no_box"] += int(bool(r.get("no_box")))
    datasets = {name: {**d, "accuracy": d["correct"] / d["scored"] if d["scored"] else None}
                for name, d in sorted(per.items())}
    accs = [d["accuracy"] for d in datasets.values() if d["accuracy"] is not None]
    scored = sum(d["scored"] for d in datasets.values())
    return {"datasets": datasets,
            "macro": sum(accs) / len(accs) if accs else None,
            "micro": sum(d["correct"] for d in datasets.values()) / scored if scored else None,
            "items": sum(d["scored"] + d["errors"] for d in datasets.values()),
            "errors": sum(d["errors"] for d in datasets.values()),
            "no_box": sum(d["no_box"] for d in datasets.values())}
