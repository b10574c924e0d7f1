"""Metrics, a Markdown table and a bar chart from result records: ours, and the released Spark scripts' results
JSON (re-scored, with the re-scorer's missing-box bug fixed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_spark.evaluation import reward_bench as rb
from megatron_spark.evaluation.scoring import SCORE_BOTH, SCORE_EXTRACTED, accuracy_table


def metrics(fmt: str, records: Sequence[dict], mode: str = "plain") -> dict:
    recs = list(records)
    if fmt == "spark":
        m = {"plain": accuracy_table(recs, "correct"), "plain_spark_compat": accuracy_table(recs, "correct_compat")}
        if mode == "tts":
            m["tts"] = accuracy_table(recs, "tts_correct")
            m["tts_spark_compat"] = accuracy_table(recs, "tts_correct_compat")
            m["tts_accepted_first_round"] = _mean([float(r["accepted"] and r["rounds_used"] == 1) for r in recs
                                                   if not r.get("error")])
        return m
    if fmt == "vlrb":
        return {"vlrb": rb.vlrb_metrics(recs), "vlrb_boxed_reparse": rb.vlrb_metrics(recs, "label_boxed")}
    if fmt == "rb2":
        return {"rb2": rb.rb2_metrics(recs), "rb2_boxed_reparse": rb.rb2_metrics(recs, "score_boxed")}
    return {"judge": rb.judge_metrics(recs)}


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def headline(fmt: str, m: dict, spark_compat: bool = False) -> dict[str, Optional[float]]:
    """{label: value} per benchmark/dataset for charts and the one-line summary."""
    if fmt == "spark":
        key = "plain_spark_compat" if spark_compat else "plain"
        out = {d: v["accuracy"] for d, v in m[key]["datasets"].items()}
        out["mean"] = m[key]["macro"]
        if "tts" in m:
            tkey = "tts_spark_compat" if spark_compat else "tts"
            out.update({f"{d} +tts": v["accuracy"] for d, v in m[tkey]["datasets"].items()})
            out["mean +tts"] = m[tkey]["macro"]
        return out
    if fmt == "vlrb":
        v = m["vlrb"]
        return {"VL-RB overall": v["overall"], "VL-RB macro": v["macro"], "VL-RB MathVerse": v["mathverse"]}
    if fmt == "rb2":
        v = m["rb2"]
        return {**{f"RB2 {k}": s for k, s in v["subsets"].items()}, "RB2 mean": v["mean"]}
    j = m["judge"]
    return {**{d: v["accuracy"] for d, v in j["datasets"].items()}, "judge mean": j["macro"]}


def markdown(fmt: str, m: dict, spark_compat: bool = False) -> str:
    if fmt == "spark":
        order = ["plain_spark_compat", "plain"] if spark_compat else ["plain", "plain_spark_compat"]
        if "tts" in m:
            order += ["tts_spark_compat", "tts"] if spark_compat else ["tts", "tts_spark_compat"]
        names = {"plain": "plain", "plain_spark_compat": "plain (spark-compat)", "tts": "tts",
                 "tts_spark_compat": "tts (spark-compat)"}
        first = m[order[0]]
        lines = ["| dataset | items | " + " | ".join(names[k] for k in order) + " | no box | errors |",
                 "|---|---:|" + "---:|" * len(order) + "---:|---:|"]
        for d, v in first["datasets"].items():
            lines.append(f"| {d} | {v['scored'] + v['errors']} | "
                         + " | ".join(_pct(m[k]["datasets"][d]["accuracy"]) for k in order)
                         + f" | {v['no_box']} | {v['errors']} |")
        lines.append(f"| **mean over datasets** | {first['items']} | "
                     + " | ".join(f"**{_pct(m[k]['macro'])}**" for k in order)
                     + f" | {first['no_box']} | {first['errors']} |")
        if m.get("protocol"):
            lines.append(f"\nprotocol: {m['protocol']}")
        return "\n".join(lines) + "\n"
    rows = headline(fmt, m)
    lines = ["| metric | accuracy (%) |", "|---|---:|"] + [f"| {k} | {_pct(v)} |" for k, v in rows.items()]
    if fmt == "judge":
        lines += [f"| label {k} | {_pct(v)} |" for k, v in m["judge"]["by_label"].items()]
        rep = m["judge"].get("report") or {}
        for key, name in (("auroc", "AUROC (x100; 50 = blind)"), ("vote_accuracy", "vote accuracy"),
                          ("min_label_accuracy", "lowest label accuracy"),
                          ("solved_misjudged", "solved but misjudged")):
            if rep.get(key) is not None:
                lines.append(f"| {name} | {_pct(rep[key])} |")
    if m.get("protocol"):
        lines.append(f"| protocol | {m['protocol']} |")
    boxed = {"vlrb": ("vlrb_boxed_reparse", "overall"), "rb2": ("rb2_boxed_reparse", "mean")}.get(fmt)
    if boxed:
        lines.append(f"| re-parsed as \\boxed{{}} verdicts ({boxed[1]}) | {_pct(m[boxed[0]][boxed[1]])} |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: dict[str, dict[str, Optional[float]]], out: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per benchmark/dataset, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(k for r in runs.values() for k in r))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(runs)) ** 0.5 + 2), 4))
    for j, (name, values) in enumerate(runs.items()):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(labels))]
        ys = [100 * (values.get(k) or 0.0) for k in labels]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_reports(out_dir: str | Path, fmt: str, records: Sequence[dict], mode: str, spark_compat: bool,
                  extra: Optional[dict] = None) -> dict:
    """metrics.json, table.md and accuracy.png in the results directory; returns the metrics."""
    out_dir = Path(out_dir)
    m = metrics(fmt, records, mode)
    m["format"], m["mode"] = fmt, mode
    if extra:
        m.update(extra)
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown(fmt, m, spark_compat))
    bar_chart({out_dir.name: headline(fmt, m, spark_compat)}, out_dir / "accuracy.png", out_dir.name)
    return m


# -- the released Spark scripts' results files ----------------------------------------------------------------------

def is_released_results(data) -> bool:
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and \
        {"dataset", "ground_truth", "vlm_output"} <= set(data[0])


def rescore_released(path: str | Path, workers: int = 2, timeout_s: float = 10.0) -> list[dict]:
    """Records of a results JSON written by the released scripts (a list of {dataset, problem, image_path,
    ground_truth, vlm_output, extracted_answer, is_correct}): `correct` re-scores the full output with our
    verifier, `correct_compat` re-checks the stored extracted answer as the released re-scorer does, except that
    a missing answer is wrong (the released one kept the previous item's verdict)."""
    from megatron_spark.reward import RewardPool

    data = json.loads(Path(path).read_text())
    if not is_released_results(data):
        raise ValueError(f"'{path}' is not a results directory of `megatron-spark eval` nor a results JSON of the "
                         f"released Spark scripts (a list of {{dataset, ground_truth, vlm_output, ...}})")
    golds = [str(r["ground_truth"]) for r in data]
    outputs = [r.get("vlm_output") or "" for r in data]
    extracted = [r.get("extracted_answer") for r in data]
    with RewardPool(workers, timeout_s, fn=SCORE_BOTH, failed_value=(0.0, 0.0)) as pool:
        ours = pool.score(outputs, golds)  # (the training reward of the whole output)
    with RewardPool(workers, timeout_s, fn=SCORE_EXTRACTED, failed_value=(0.0, 0.0)) as pool:
        compat = pool.score(extracted, golds)
    return [{"id": str(i), "dataset": r["dataset"], "correct": o[0], "correct_compat": c[1],
             "no_box": e is None, "error": None, "released_is_correct": r.get("is_correct")}
            for i, (r, o, c, e) in enumerate(zip(data, ours, compat, extracted))]
