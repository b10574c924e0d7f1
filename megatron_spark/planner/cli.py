"""`megatron-spark plan`: ranked layouts for a model on N GPUs (pure Python, seconds; see docs/scaling.md)."""
from __future__ import annotations

import argparse


def add_plan_args(p: argparse.ArgumentParser) -> None:
    from megatron_spark.planner.hardware import GPUS
    from megatron_spark.planner.model import BUILTIN

    p.add_argument("--model", required=True, help=f"{', '.join(BUILTIN)}, a HF directory or a config.json")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--config", help="also evaluate the layout and shape of this training config (YAML)")
    p.add_argument("--prompts", type=int, default=64, help="task prompts per step")
    p.add_argument("--reward-prompts", type=int, default=64, help="recycled tasks per step (0: plain GRPO)")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--image-tokens", type=int, default=1024, help="LLM tokens per image (0 for text)")
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--attention", choices=["flash", "unfused"], default="flash")
    p.add_argument("--mfu", type=float, default=0.30, help="training MFU (calibrated default, see docs/scaling.md)")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--reference-offloaded", action="store_true", help="no reference model on the GPU")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", action="store_true")


def run_plan(args) -> int:
    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.memory import GIB, Workload
    from megatron_spark.planner.model import load_model
    from megatron_spark.planner.search import (evaluate, from_config, header, layout_problem, report, search,
                                               to_json)

    shape = load_model(args.model)
    hw = gpu(args.gpu)
    image_tokens = args.image_tokens if shape.vision is not None else 0
    work = Workload(args.prompts, args.reward_prompts, args.n_samples, args.prompt_len, image_tokens,
                    args.response_len, args.micro_batch_size, None, args.max_num_seqs, "bf16", args.attention)
    plans = search(shape, args.gpus, args.gpus_per_node, hw, work, args.mfu, not args.no_distributed_optimizer,
                   not args.reference_offloaded)
    if args.json:
        print(to_json(plans))
        return 0
    print(header(shape, args.model))
    print(f"{args.gpus} x {hw.name} ({args.gpus_per_node} per node); a step: ({work.prompts} + {work.reward_prompts})"
          f" prompts x {work.n_samples} samples of {work.prompt_len} + {work.image_tokens} image + "
          f"{work.response_len} tokens; MFU {args.mfu:.2f}; predictions (docs/scaling.md)\n")
    print(report(plans, args.top))
    if args.config:
        from dataclasses import replace

        from megatron_spark.config import load_config

        cfg = load_config(args.config)
        layout, cwork = from_config(cfg)
        layout = replace(layout, dp=args.gpus // (layout.tp * layout.pp))
        cwork = replace(cwork, attention=args.attention)  # (its prompt_max_len counts the image tokens)
        problem = layout_problem(shape, layout, cwork)
        if problem:
            print(f"\n{args.config}: {layout.describe()} is not a valid layout on {args.gpus} GPUs: {problem}")
            return 0
        p = evaluate(shape, layout, cwork, hw, args.gpus_per_node, args.mfu)
        m = p.peak
        print(f"\n{args.config}: {layout.describe()}: peak {m.peak / GIB:.1f} GiB (stage {m.stage}, {m.peak_phase}), "
              f"step {p.time.total:.0f} s, {p.tokens_per_gpu_s():.0f} tokens/s/GPU: "
              + ("fits" if p.feasible else f"does NOT fit: {p.reason}"))
        from megatron_spark.planner.fit import check_fit

        fit = check_fit(cfg, shape, args.gpus, hw.memory_gib * GIB)
        print(f"  the job's phases: {fit.describe()}: "
              + ("fits with >= 5% free in every phase" if fit.ok else "refused by `megatron-spark train`:"))
        for problem in fit.problems:
            print(f"  - {problem}")
    return 0


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", help="GRID.yaml to run a sweep, or `report` / `run-one`")
    p.add_argument("path", nargs="?", help="report: the sweep directory; run-one: the sweep directory")
    p.add_argument("index", nargs="?", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help="sweep directory (one subdirectory per run)")
    p.add_argument("--slurm", action="store_true", help="submit as an sbatch --array job (slurm/sweep.sbatch)")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the array and write the report")
    p.add_argument("--sbatch-args", default="", help="extra sbatch arguments, e.g. '--partition=gpu --gpus-per-task=8'")


def run_sweep(args) -> int:
    import time

    from megatron_spark.planner import sweep
    from megatron_spark.planner.sweep_report import report

    if args.what == "report":
        if not args.path:
            raise ValueError("usage: megatron-spark sweep report DIR")
        print(report(args.path))
        return 0
    if args.what == "run-one":
        r = sweep.run_one(args.path, args.index)
        return 0 if r["status"] in ("ok", "invalid") else 1
    if not args.out:
        raise ValueError("--out: where the sweep's runs and report go")
    plan = sweep.prepare(args.what, args.out)
    print(f"{len(plan['runs'])} runs -> {args.out}", flush=True)
    if not args.slurm:
        sweep.run_local(args.out)
        print(report(args.out))
        return 0
    job = sweep.submit(args.out, args.sbatch_args.split())
    print(f"submitted array job {job} ({len(plan['runs'])} tasks); `megatron-spark sweep report {args.out}` when done")
    if args.wait:
        while True:
            p = __import__("subprocess").run(["squeue", "-h", "-j", job], capture_output=True, text=True)
            if p.returncode == 0 and not p.stdout.strip():
                break
            time.sleep(5)
        print(report(args.out))
    return 0
