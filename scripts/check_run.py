"""Check a training run's metrics.jsonl (used by scripts/gpu_checks.sh): the expected steps, every number finite,
samples generated, and the trainer/engine log-prob drift under a bound. Prints the key figures; exit 1 on failure."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--max-drift", type=float, required=True)
    ap.add_argument("--min-grad-norm", type=float, default=1e-6, help="every step's infer update must move")
    a = ap.parse_args(argv)
    rows = [json.loads(x) for x in (Path(a.run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    problems = []
    if [r["step"] for r in rows] != list(range(1, a.steps + 1)):
        problems.append(f"steps {[r['step'] for r in rows]}, expected 1..{a.steps}")
    for r in rows:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            problems.append(f"step {r['step']}: non-finite {bad[:5]}")
        if (r.get("infer/grad_norm") or 0.0) < a.min_grad_norm:
            problems.append(f"step {r['step']}: infer grad_norm {r.get('infer/grad_norm')} < {a.min_grad_norm}")
        for period in ("infer", "reward"):
            drift = r.get(f"{period}/train_rollout_logprob_drift")
            if drift is not None and drift > a.max_drift:
                problems.append(f"step {r['step']}: {period} drift {drift:.2e} > {a.max_drift}")
        print(f"step {r['step']}: reward {r.get('infer/reward_mean')}, "
              f"drift {r.get('infer/train_rollout_logprob_drift')}"
              f", grad_norm {r.get('infer/grad_norm')}, kl {r.get('infer/kl')}, samples "
              f"{r.get('infer/samples_generated')}, memory {r.get('memory/max_allocated_gib')}")
    for p in problems:
        print("FAIL:", p)
    print("ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
