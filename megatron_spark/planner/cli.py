"""`megatron-spark plan`: ranked layouts for a model on N GPUs (pure Python, seconds; see docs/scaling.md)."""
from __future__ import annotations

import argparse


def add_plan_args(p: argparse.ArgumentParser) -> None:
    from megatron_spark.planner.hardware import GPUS
    from megatron_spark.planner.model import BUILTIN

    p.add_argument("--model", required=True,
                   help=f"{', '.join(BUILTIN)}, or as in eval: a HF directory (or its config.json) or a Megatron "
                        f"checkpoint")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (all nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays within a node)")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU model (memory, FLOP/s, bandwidth)")
    p.add_argument("--config", help="also evaluate the layout and shape of this training config (YAML)")
    p.add_argument("--prompts", type=int, default=64, help="task prompts per step")
    p.add_argument("--reward-prompts", type=int, default=64, help="recycled tasks per step (0: plain GRPO)")
    p.add_argument("--n-samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=1024, help="text tokens per prompt")
    p.add_argument("--image-tokens", type=int, default=1024, help="LLM tokens per image (0 for text)")
    p.add_argument("--response-len", type=int, default=1024, help="tokens per response")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's concurrent sequences per engine")
    p.add_argument("--attention", choices=["flash", "unfused"], default="flash",
                   help="flash: TE / flash-attn kernels (GPU default); unfused: scores materialised (local spec)")
    p.add_argument("--mfu", type=float, default=0.30, help="training MFU (calibrated default, see docs/scaling.md)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer state not sharded over DP")
    p.add_argument("--reference-offloaded", action="store_true", help="no reference model on the GPU")
    p.add_argument("--top", type=int, default=8, help="layouts listed")
    p.add_argument("--placements", action="store_true",
                   help="also compare colocated engines, disaggregated ones (GPUs of their own) and one-step "
                        "off-policy overlap, each at its best split and layout")
    p.add_argument("--json", action="store_true", help="machine-readable output")


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
    if args.placements:
        from megatron_spark.planner import placements

        print("\nPlacements (the best of each; tokens/s/GPU over every GPU of the job):\n")
        print(placements.report(placements.compare(shape, args.gpus, args.gpus_per_node, hw, work, args.mfu,
                                                   not args.no_distributed_optimizer,
                                                   not args.reference_offloaded)))
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
        from megatron_spark.planner.fit import check_fit

        # one verdict, `megatron-spark train`'s: the peak of each phase on the most loaded GPU (plan_memory's
        # numbers for this vLLM share), each with >= 5 % of the GPU free
        fit = check_fit(cfg, shape, args.gpus, hw.memory_gib * GIB)
        print(f"\n{args.config}: {layout.describe()}: step {p.time.total:.0f} s, {p.tokens_per_gpu_s():.0f} "
              f"tokens/s/GPU ({p.peak.concurrency} sequences per engine at once)\n"
              f"  peak per phase: {fit.describe()}: "
              + ("fits with >= 5% free in every phase" if fit.ok else "does NOT fit (refused by `megatron-spark "
                                                                     "train`):"))
        for problem in fit.problems:
            print(f"  - {problem}")
    return 0


SWEEP_COMMANDS = ("run", "report", "run-one")


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_cmd", required=True)
    r = sub.add_parser("run", help="run every layout of a grid (locally, or as an sbatch --array job)")
    r.add_argument("grid", help="GRID.yaml: base config, grid of layouts and/or single runs")
    r.add_argument("--out", required=True, help="sweep directory (one subdirectory per run)")
    r.add_argument("--slurm", action="store_true", help="submit as an sbatch --array job (slurm/sweep.sbatch)")
    r.add_argument("--wait", action="store_true", help="with --slurm: wait for the array and write the report")
    r.add_argument("--sbatch-args", default="", help="extra sbatch arguments, e.g. '--partition=gpu --gpus-per-task=8'")
    rep = sub.add_parser("report", help="DIR/report.md (a row per run, failures with their reason) + report.png")
    rep.add_argument("dir", help="the sweep directory")
    one = sub.add_parser("run-one", help="one run of a prepared sweep (each array task of slurm/sweep.sbatch)")
    one.add_argument("dir", help="the sweep directory")
    one.add_argument("index", type=int, help="the run's index in DIR/plan.json")


def sweep_argv(argv: list[str]) -> list[str]:
    """`megatron-spark sweep GRID.yaml ...` (the form before the subcommands) means `sweep run GRID.yaml ...`."""
    if len(argv) > 1 and argv[0] == "sweep" and argv[1] not in SWEEP_COMMANDS + ("-h", "--help"):
        return ["sweep", "run", *argv[1:]]
    return argv


def run_sweep(args) -> int:
    import time

    from megatron_spark.planner import sweep
    from megatron_spark.planner.sweep_report import report

    if args.sweep_cmd == "report":
        print(report(args.dir))
        return 0
    if args.sweep_cmd == "run-one":
        r = sweep.run_one(args.dir, args.index)
        return 0 if r["status"] in ("ok", "invalid") else 1
    plan = sweep.prepare(args.grid, args.out)
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
