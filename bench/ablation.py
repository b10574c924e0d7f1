#!/usr/bin/env python
"""SPARK's co-evolution at small scale: SPARK (the `make run` job) vs policy-only GRPO, at an equal number of task
updates.

    python bench/ablation.py [--seeds 0 1 2 3 4] [--steps 60] [--out runs/ablation] [--arms spark policy]

Each (arm, seed) is the `make run` job (`megatron-spark demo`: tiny Qwen2.5-VL, the shapes task, the same warm
start) for `--steps` global steps, each with one infer period on 8 task prompts: both arms make the same task
updates (the paper's comparison, at equal task data), and SPARK's reward periods come on top. Arms:
  spark   the demo's recycling (examples/tiny_cpu.yaml: judge and reflection tasks)
  policy  no recycling (algorithm.recycle.judge_cap=0, reflection_cap=0): GRPO on the task prompts only
  others  (--arms): judge (judge tasks only), spark+balanced (balanced pointwise labels and 8 samples per judge
          task), spark+counterfactual (a judge group with one verdict gets one sample of the other:
          algorithm.recycle.counterfactual_verdicts), full+fp8 (FP8 rollouts with truncated importance sampling)
Measured on held-out data every 10 steps during training (greedy task accuracy; the judge's accuracy, per label,
AUROC from 8 sampled verdicts: eval.file) and before/after RL by the demo's own table. Writes OUT/ablation.md
(mean and spread over seeds per arm, the change of each judge metric from before RL, and every seed),
OUT/ablation.json and OUT/ablation.png (held-out task accuracy and judge AUROC over steps).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICY_ONLY = ["algorithm.recycle.judge_cap=0", "algorithm.recycle.reflection_cap=0"]
ARMS = {"spark": [],
        "policy": POLICY_ONLY,
        "judge": ["algorithm.recycle.reflection_cap=0"],
        "spark+balanced": ["algorithm.recycle.balance_pointwise=true", "algorithm.recycle.samples_per_task=8"],
        "spark+counterfactual": ["algorithm.recycle.counterfactual_verdicts=true"],
        "full+fp8": ["rollout.quantization=fp8", "algorithm.rollout_is=tis"]}
COLORS = {"spark": "tab:green", "policy": "tab:blue", "judge": "tab:orange", "spark+balanced": "tab:red",
          "spark+counterfactual": "tab:purple",
          "full+fp8": "tab:brown"}
JUDGE = ("judge_accuracy", "judge_auroc", "judge_min_label_accuracy", "judge_vote_accuracy")


def run_arm(out: Path, arm: str, seed: int, steps: int) -> dict:
    run = out / f"{arm}-seed{seed}"
    # a fresh directory: a leftover one would resume its checkpoint and append to its metrics
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "megatron_spark.cli", "demo", "--run-dir", str(run), "--seed", str(seed),
           "--skip-eval", f"training.max_steps={steps}", "logging.progress_bar=false",
           f"eval.file={run / 'data_eval' / 'bench.json'}", "eval.interval=10", *ARMS[arm]]
    with open(out / f"{arm}-seed{seed}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    res = {"arm": arm, "seed": seed, "rc": rc, "seconds": round(time.time() - t0)}
    if rc:
        return res
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res["curve"] = [(r["step"], r["eval/task_accuracy"], r.get("eval/judge_auroc", 0.5)) for r in rows
                    if "eval/task_accuracy" in r]
    res["steps"] = len(rows)
    res["reward_updates"] = int(sum(r.get("reward/optimizer_steps", 0) for r in rows))
    res["task_updates"] = int(sum(r.get("infer/optimizer_steps", 0) for r in rows))
    # the share of the reward periods' judge groups with reward spread (a gradient) as sampled, over the run
    # (with counterfactual verdicts the diagnostics count the rewritten samples: the figure before the swaps)
    key = "reward/diag/judge_groups_with_gradient"
    spread = [r.get("reward/judge_groups_with_gradient_sampled", r[key]) for r in rows if key in r]
    res["judge_groups_with_gradient"] = statistics.mean(spread) if spread else None
    demo = json.loads((run / "demo_result.json").read_text())
    res["before"], res["after"] = demo["before"], demo["after"]
    return res


def _value(r: dict, when: str, key: str) -> float:
    v = r[when].get(key)
    return 0.5 if v is None and key == "judge_auroc" else (v if v is not None else float("nan"))


def _cell(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]"


def table(results: list[dict]) -> str:
    ok = [r for r in results if r["rc"] == 0]
    lines = ["| arm | seeds | task: before -> after | judge accuracy: before -> after (change) | judge AUROC: before "
             "-> after (change) | lowest label accuracy after | judge groups with a gradient as sampled "
             "(training) | task / reward updates |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in ok if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for key in ("task_accuracy", "judge_accuracy", "judge_auroc"):
            b, a = [_value(r, "before", key) for r in rs], [_value(r, "after", key) for r in rs]
            change = [y - x for x, y in zip(b, a)]
            cells.append(f"{statistics.mean(b):.3f} -> {_cell(a)}" +
                         ("" if key == "task_accuracy" else f" ({statistics.mean(change):+.3f})"))
        low = _cell([_value(r, "after", "judge_min_label_accuracy") for r in rs])
        updates = f"{statistics.mean(r['task_updates'] for r in rs):.0f} / " \
                  f"{statistics.mean(r['reward_updates'] for r in rs):.0f}"
        grads = [r["judge_groups_with_gradient"] for r in rs if r.get("judge_groups_with_gradient") is not None]
        grad = _cell(grads) if grads else "-"
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {low} | {grad} | {updates} |")
    keys = ("task_accuracy",) + JUDGE
    lines += ["", "| arm | seed | " + " | ".join(f"{k} (before -> after)" for k in keys) + " | minutes |",
              "|---|---|" + "---|" * len(keys) + "---|"]
    for r in results:
        if r["rc"]:
            lines.append(f"| {r['arm']} | {r['seed']} | failed (exit {r['rc']}) |")
            continue
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(
            f"{_value(r, 'before', k):.3f} -> {_value(r, 'after', k):.3f}" for k in keys)
            + f" | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, (ax, title) in enumerate(zip(axes, ("held-out task accuracy (greedy)", "held-out judge AUROC"))):
        for arm in ARMS:
            for r in [r for r in results if r["arm"] == arm and r["rc"] == 0]:
                ax.plot([c[0] for c in r["curve"]], [c[1 + k] for c in r["curve"]], marker=".", alpha=0.8,
                        label=f"{arm} seed {r['seed']}", color=COLORS[arm])
        ax.set_xlabel("global steps (equal task updates)")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=60, help="global steps per run: the same task updates in every arm")
    ap.add_argument("--arms", nargs="+", default=["spark", "policy"], choices=list(ARMS))
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--redo", action="store_true", help="rerun (arm, seed) pairs already in OUT/ablation.json "
                    "(default: keep them, so arms can be added to a study)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "ablation.json"
    results = [] if a.redo or not done.exists() else [r for r in json.loads(done.read_text()) if r["rc"] == 0]
    for seed in a.seeds:
        for arm in a.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            r = run_arm(out, arm, seed, a.steps)
            results.append(r)
            print(f"{arm} seed {seed}: " + (f"task {r['after']['task_accuracy']:.3f}, judge accuracy "
                                            f"{r['after']['judge_accuracy']:.3f}, AUROC "
                                            f"{_value(r, 'after', 'judge_auroc'):.3f}, {r['steps']} steps, "
                                            f"{r['seconds'] / 60:.1f} min"
                                            if r["rc"] == 0 else f"failed (exit {r['rc']}), see the log"),
                  flush=True)
            (out / "ablation.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "ablation.md").write_text(text)
    plot(results, out / "ablation.png")
    print(text)
    print(f"{out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
