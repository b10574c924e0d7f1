"""`megatron-spark train` under torchrun: build every component from the config, then run the SPARK loop.

    torchrun --nproc-per-node N -m megatron_spark.train --config CONFIG [section.field=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist

from megatron_spark.config import SparkConfig, load_config, validate_for_launch

if TYPE_CHECKING:
    from megatron_spark.rollout.remote import EngineServer
    from megatron_spark.stack import RLStack


def check_data_files(cfg: SparkConfig) -> None:
    """Every record of the training file (and the held-out file) parses, names an answer and its images exist: a
    bad record is one error naming the file, the record and the fix, before any process starts."""
    from megatron_spark.data import DataError, load_records

    d = cfg.data
    for field, path in (("data.train_file", d.train_file), ("eval.file", cfg.eval.file)):
        if path is None or (field == "eval.file" and not cfg.eval.interval):
            continue
        try:
            if field == "data.train_file":
                load_records(path, d.prompt_key, d.answer_key, d.skip_bad_records)
            else:  # (a training-format file, or a benchmark file in the released format)
                from megatron_spark.evaluation.periodic import load_held_out

                load_held_out(path, cfg.eval.max_items, d.max_pixels)
        except DataError as e:
            raise DataError(f"{field} '{path}': {e}") from None


def prelaunch_check(cfg: SparkConfig, world: int, force: bool = False):
    """Everything that can be known before a process starts: the config, the layout against the model, and on a
    GPU the planner's memory verdict for this job's layout (refused with the phase, the numbers and a fix; a
    warning with `force`). Returns the model's shape (None without model.hf_dir)."""
    shape = validate_for_launch(cfg, world)
    check_data_files(cfg)
    ck = cfg.checkpoint
    if ck.dir and ck.resume and Path(ck.dir).is_dir():  # an unusable checkpoint directory fails here, in one line
        from megatron_spark.checkpoint import usable_step

        usable_step(Path(ck.dir), say=False)
    from megatron_spark.planner.fit import check_fit, gpu_memory_bytes

    gpu_bytes = gpu_memory_bytes()
    if shape is not None and gpu_bytes is not None:
        from megatron_spark.compat import have_transformer_engine

        fit = check_fit(cfg, shape, world, gpu_bytes, te_available=have_transformer_engine())
        if not fit.ok:
            msg = (f"the planner predicts this layout does not fit {world} GPU(s) of "
                   f"{gpu_bytes / 2 ** 30:.0f} GiB ({fit.describe()}):\n  " + "\n  ".join(fit.problems))
            if not force:
                raise ValueError(msg + "\n(pass --force to start anyway)")
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"warning: {msg}\n(--force: starting anyway)", file=sys.stderr, flush=True)
    return shape


def build_stack(cfg: SparkConfig, world: int, force: bool = False, record_reads: Optional[str] = None
                ) -> Union["RLStack", "EngineServer"]:
    """Every component of the run from the config, each given the section it consumes; on a rollout rank of
    disaggregated engines, its engine server (which `main` runs until the trainer says stop). `record_reads`: a
    file that receives, at exit, every config leaf the components read (the config tests)."""
    from megatron_spark.data import PromptBuilder, PromptStream
    from megatron_spark.evaluation.periodic import HeldOutEval
    from megatron_spark.metrics import MetricsLogger
    # (megatron-core is imported here, not at the top: the helper processes started with `spawn` -- reward workers,
    # the checkpoint writer's Manager -- import this module as their __main__, and need none of it)
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.policy import Policy
    from megatron_spark.reward import RewardPool, VerifierConfig
    from megatron_spark.placement import RolloutPlacement
    from megatron_spark.stack import RLStack
    from megatron_spark.templates import TemplateBank

    if cfg.model.hf_dir is None:
        raise ValueError("config field 'model.hf_dir': set it to a Hugging Face model directory "
                         "(or run `megatron-spark demo` for the built-in tiny model)")
    if cfg.data.train_file is None:
        raise ValueError("config field 'data.train_file': set it to a Spark-format JSON file")
    shape = prelaunch_check(cfg, world, force)
    if record_reads:  # (after the checks: what the components read, not what validation does)
        from megatron_spark.config import dump_reads_at_exit

        dump_reads_at_exit(record_reads)
    m = cfg.model
    placement = RolloutPlacement.from_config(cfg.rollout, world)  # which rank does what
    layout = ParallelLayout.from_config(cfg.parallel, placement.train_world)
    job_group = None
    if placement.disaggregated:  # a default world per role, and the job group over both (rollout/remote.py)
        from megatron_spark.parallel import process_group_backend
        from megatron_spark.rollout.remote import init_role_worlds

        # (waits across the job group last as long as a phase of the other role -- a generation, a checkpoint -- so
        # its timeout is far above the step watchdog's, which is what detects a hang)
        timeout = int(max(4 * cfg.training.hang_timeout_s, 7200))
        job_group = init_role_worlds(placement, process_group_backend(torch.cuda.is_available()), timeout_s=timeout)
        if not placement.trains(job_group.rank):
            return engine_server(cfg, shape, layout, placement, job_group)
    layout.initialize(seed=cfg.training.seed)
    rank = dist.get_rank()
    multimodal = shape.multimodal
    prompts = PromptBuilder.from_config(cfg.data, m.hf_dir, multimodal)
    data = PromptStream.from_config(cfg.data, prompts, cfg.training.seed, say=placement.writes(rank))
    episodes = cfg.data.num_episodes * data.steps_per_episode  # (read even when max_steps is set: it is validated)
    total_steps = cfg.training.max_steps or episodes
    pad_id = prompts.tokenizer.pad_token_id or 0
    policy = Policy.build(shape, layout, m, cfg.training, pad_id=pad_id,
                          total_steps=lr_decay_steps(cfg, total_steps, data.batch_size))
    reference = Policy.build(shape, layout, m, cfg.training, pad_id=pad_id, trainable=False)
    engine, sync, rollouts = build_rollouts(cfg, shape, layout, placement, policy, rank, job_group)
    pool = None
    if rank == placement.reward_rank:
        pool = RewardPool.from_config(cfg.algorithm)
    logger = MetricsLogger.from_config(cfg.logging, placement.writes(rank), cfg.to_dict(),
                                       resume=cfg.checkpoint.resume)
    templates = TemplateBank.load(cfg.algorithm.recycle.templates_file)
    evaluation = HeldOutEval.from_config(cfg.eval, cfg.data.max_pixels, cfg.algorithm.recycle.max_pixels,
                                         rollouts=rollouts, prompts=prompts, templates=templates,
                                         seed=cfg.training.seed, verifier=VerifierConfig.from_config(cfg.algorithm))
    return RLStack(shape=shape, layout=layout, placement=placement, prompts=prompts, data=data, policy=policy,
                   reference=reference, engine=engine, sync=sync, rollouts=rollouts, rewards=pool,
                   templates=templates, evaluation=evaluation, logger=logger, total_steps=total_steps)


def lr_decay_steps(cfg: SparkConfig, total_steps: int, rollout_batch: int) -> int:
    """The optimizer steps the LR schedule decays over. It counts every optimizer step, of both periods: an infer
    period makes (rollout_batch x n / global_batch) steps and a reward period at most (reward_batch x its n /
    global_batch), so their sum per step is an upper bound: the cosine never rises again (the original's overran)."""
    rc, gbs, n = cfg.algorithm.recycle, cfg.training.global_batch_size, cfg.rollout.n_samples_per_prompt
    per_infer = rollout_batch * n // gbs
    per_reward = rc.reward_batch_size * (rc.samples_per_task or n) // gbs
    return total_steps * (per_infer + max(per_infer, per_reward)) + cfg.training.sft_warmup_steps


def build_rollouts(cfg: SparkConfig, shape, layout, placement, policy, rank: int, job_group):
    """(this rank's engine or None, the weight sync, the rollouts): colocated engines in the trainer's processes,
    or the training side of disaggregated ones (`job_group`)."""
    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.rollout.build import build_engine
    from megatron_spark.rollout.colocated import ColocatedRollouts
    from megatron_spark.rollout.engine import Sampling
    from megatron_spark.rollout.remote import RemoteRollouts

    m, ro = cfg.model, cfg.rollout
    fp8_engine = ro.quantization == "fp8" and torch.cuda.is_available()
    wmap = WeightMap(shape, tp=layout.tp)
    if job_group is None:
        engine = build_engine(ro, fp8_engine_dir(cfg) if fp8_engine else m.hf_dir, shape, dtype=m.dtype,
                              seed=cfg.training.seed, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
        sync = WeightSync.from_config(ro, policy.modules, wmap, layout, engine, fp8_engine)
        rollouts = ColocatedRollouts(engine, sync, placement, rank, Sampling.from_config(ro))
    else:
        engine = None
        sync = WeightSync.from_config(ro, policy.modules, wmap, layout, None, fp8_engine, placement, job_group)
        rollouts = RemoteRollouts(job_group, sync, placement, Sampling.from_config(ro))
    if m.megatron_ckpt or (ro.quantization != "none" and not fp8_engine):
        # the engine loaded model.hf_dir: give it the trainer's weights (a Megatron checkpoint's, or their FP8
        # values) before the first rollout
        rollouts.push()
    return engine, sync, rollouts


def engine_server(cfg: SparkConfig, shape, layout, placement, job_group) -> "EngineServer":
    """A rollout rank of disaggregated engines: its engine worker and its end of the weight sync, ready to generate
    and take weights when told, until the trainer says stop (rollout/remote.py)."""
    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.dtypes import torch_dtype
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.rollout.build import build_engine
    from megatron_spark.rollout.remote import EngineServer

    import signal

    # SLURM's preemption signal reaches every task: the trainer checkpoints (collecting the round these engines are
    # generating) and then tells them to stop; an engine that died of the signal would take the checkpoint with it
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: None)
    ro, m = cfg.rollout, cfg.model
    fp8_engine = ro.quantization == "fp8" and torch.cuda.is_available()
    engine = build_engine(ro, fp8_engine_dir(cfg) if fp8_engine else m.hf_dir, shape, dtype=m.dtype,
                          seed=cfg.training.seed, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    sync = WeightSync.from_config(ro, [], WeightMap(shape, tp=layout.tp), layout, engine, fp8_engine, placement,
                                  job_group, dtype=torch_dtype(m.dtype))
    return EngineServer(engine, sync, job_group, placement)


def fp8_engine_dir(cfg) -> str:
    """CUDA vLLM with FP8 rollouts starts from an FP8 (per-channel) checkpoint of the initial HF weights, so that it
    is built with FP8 layers; every sync then replaces weights and scales. Rank 0 streams it from model.hf_dir (one
    tensor in memory at a time) and reuses it while the source is the same."""
    from megatron_spark.quant.rollout_checkpoint import write_fp8_checkpoint

    out = Path(cfg.logging.dir) / "rollout_fp8_init"
    source = str(Path(cfg.model.hf_dir).resolve())
    stamp = out / "megatron_spark_source.txt"
    if dist.get_rank() == 0 and not (stamp.is_file() and stamp.read_text() == source):
        write_fp8_checkpoint(cfg.model.hf_dir, out, force=True)
        stamp.write_text(source)
    dist.barrier()
    return str(out)


def refuse_restarts(reason: str) -> None:
    """A bad config or input fails the same way every time: record the reason where the launcher looks
    (SPARK_NO_RETRY_FILE, set by `megatron-spark train` and slurm/train.sbatch, which then neither restart nor
    requeue), and under torchrun's own restarts (`--max-restarts`) stop this node's agent, which ends every rank."""
    marker = os.environ.get("SPARK_NO_RETRY_FILE")
    if not marker:
        return
    Path(marker).write_text(reason)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        import signal
        import time

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # (after the error is printed) the torchrun agent
            os.kill(os.getppid(), signal.SIGTERM)
        else:  # an exit now would count as a failure to restart from: wait for the agent to end this rank
            time.sleep(120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-spark train")
    ap.add_argument("--config", default=None, help="YAML config (examples/*.yaml); defaults for what it leaves out")
    ap.add_argument("--force", action="store_true",
                    help="start even when the planner predicts the layout does not fit the GPUs (a warning)")
    ap.add_argument("overrides", nargs="*", help="section.field=value, e.g. training.lr=1e-6")
    a = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from megatron_spark.checkpoint import CheckpointManager
    from megatron_spark.rollout.remote import EngineServer
    from megatron_spark.trainer import SparkTrainer
    from megatron_spark.watchdog import FaultPlan, NonFiniteUpdates

    try:
        cfg = load_config(a.config, a.overrides)
        reads = os.environ.get("SPARK_CONFIG_READS")  # tests: which config leaves this process consumes
        stack = build_stack(cfg, world, a.force, record_reads=f"{reads}.{os.getpid()}.json" if reads else None)
        if isinstance(stack, EngineServer):  # a rollout rank of disaggregated engines: serve, below
            server, stack = stack, None
        else:
            server = None
            trainer = SparkTrainer(cfg, stack, FaultPlan.from_env())  # (the e2e tests' injected faults)
            ckpt = CheckpointManager.for_trainer(cfg, trainer, prompt_protocol(cfg)) if cfg.checkpoint.dir else None
            start = ckpt.resume() if ckpt else 0
    except ValueError as e:  # a bad config, input or checkpoint (the same on every rank): one message, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        refuse_restarts(str(e))
        return 2
    if server is not None:  # (outside the config errors: whatever goes wrong now is not the config's fault)
        server.serve()
        return 0
    finished = False
    try:
        if start:  # the engine still holds the initial weights: bring it to the resumed policy
            stack.rollouts.push()
        stack.logger.resume_at(start)  # steps logged after that checkpoint are redone: each step once
        trainer.run(start, stack.total_steps, on_step=checkpointing(stack, ckpt) if ckpt else None)
        if ckpt is not None:
            ckpt.finish()
        finished = True
    except NonFiniteUpdates as e:  # diverged: the same again after a restart, so never retried
        if ckpt is not None:
            ckpt.wait()  # (raised on every rank at the same step) a background save of clean weights completes
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        refuse_restarts(str(e))
        finished = True
        return 3
    finally:
        # after an error, leave disaggregated engines as they are (draining them could wait on a rank that is
        # gone): this rank's exit makes torchrun end them
        stack.close(stop_engines=finished)
    dist.barrier()
    return 0


def prompt_protocol(cfg: SparkConfig):
    """How this run builds and samples prompts (`megatron-spark eval --protocol trained` reads it beside the
    checkpoints): the rollout's sampling, the data's image bounds, recycling's templates and image bound."""
    from megatron_spark.evaluation.protocol import TrainedPrompts

    ro, rc = cfg.rollout, cfg.algorithm.recycle
    return TrainedPrompts(ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens, cfg.data.min_pixels,
                          cfg.data.max_pixels, Path(rc.templates_file).read_text() if rc.templates_file else None,
                          recycled_max_pixels=rc.max_pixels, chat_template_kwargs=cfg.data.chat_template_kwargs)


def checkpointing(stack: "RLStack", ckpt):
    """After each step: the checkpoint and HF export when due, with a colocated engine asleep meanwhile (on a GPU
    their gathers need the memory its weights and KV cache hold; the next generation wakes it)."""
    def on_step(step: int, metrics: dict, stopping: bool) -> None:
        if ckpt.due(step, stopping):
            stack.rollouts.sleep()
        ckpt.on_step(step, metrics, stopping)
    return on_step


if __name__ == "__main__":
    sys.exit(main())
