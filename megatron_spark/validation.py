"""Every rule a config must satisfy, each error naming the dotted field and the fix.

Each section is checked on its own (`SECTION_CHECKS`: the rules that need nothing but the section), then the rules
that tie sections together (`cross_section_rules`: the layout against the model and the job's world, the engines'
placement against the modes that need it, the batch arithmetic). The config tree is passed in; this module does not
import it (`megatron_spark.config` calls `validate`).
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Callable, Optional

from megatron_spark.layout_rules import LAYOUT_FIELDS, ModelFacts, model_layout_problems, stage_layers


def fail(path: str, msg: str) -> typing.NoReturn:
    raise ValueError(f"config field '{path}': {msg}")


def positive(path: str, value: Optional[int | float]) -> None:
    if value is not None and value <= 0:
        fail(path, f"must be > 0, got {value}")


def at_least_zero(path: str, value: float, meaning: str) -> None:
    if value < 0:
        fail(path, f"must be >= 0 ({meaning}), got {value}")


# --- one section at a time ---------------------------------------------------------------------------------------

def check_model(m) -> None:
    from megatron_spark.io.checkpoint_layout import is_megatron_checkpoint
    from megatron_spark.models.freeze import check_freeze

    check_freeze(m.freeze)
    if m.hf_dir is not None and not Path(m.hf_dir).is_dir():
        fail("model.hf_dir", f"directory '{m.hf_dir}' does not exist; point it at a HF checkpoint directory")
    if m.megatron_ckpt is not None and not is_megatron_checkpoint(m.megatron_ckpt):
        fail("model.megatron_ckpt", f"'{m.megatron_ckpt}' is not a megatron checkpoint (no "
             f"latest_checkpointed_iteration.txt or .metadata); write one with `megatron-spark convert "
             f"hf-to-megatron`")
    if m.dtype == "fp16":
        fail("model.dtype", "fp16 training needs dynamic loss scaling, which this trainer does not do (its "
                            "updates would underflow to nothing); use bf16 on GPUs (or fp32); fp16 stays available "
                            "for exports (`megatron-spark convert ... --dtype fp16`)")


def check_parallel(par) -> None:
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        positive(f"parallel.{name}", getattr(par, name))
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None:
        positive("parallel.virtual_pipeline_model_parallel_size", vpp)
        if par.pipeline_model_parallel_size == 1:
            fail("parallel.virtual_pipeline_model_parallel_size",
                 "virtual pipeline stages need pipeline_model_parallel_size > 1; unset it or raise PP")
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        fail("parallel.sequence_parallel", "sequence parallelism needs TP > 1; set it to false")
    if par.context_parallel_size > 1:
        fail("parallel.context_parallel_size", f"context parallelism ({par.context_parallel_size}) is not "
             "implemented: nothing splits sequences over CP ranks yet; set it to 1 (use sequence_parallel with "
             "TP > 1, or PP, for long sequences)")


def check_rollout(ro) -> None:
    positive("rollout.tensor_parallel_size", ro.tensor_parallel_size)
    if ro.placement == "disaggregated":
        if ro.num_ranks < 1 or ro.num_ranks % ro.tensor_parallel_size:
            fail("rollout.num_ranks", f"disaggregated engines need their own ranks: a positive multiple of "
                                      f"rollout.tensor_parallel_size={ro.tensor_parallel_size}, got {ro.num_ranks}")
        if ro.backend != "vllm":
            fail("rollout.placement", "disaggregated engines are vLLM engines; set rollout.backend=vllm")
        if ro.sync_target == "vllm_tp":
            fail("rollout.sync_target", "disaggregated engines load the weights through vLLM's loader (in-place "
                                        "writes across processes are not built yet); use hf_full (or auto)")
    elif ro.num_ranks:
        fail("rollout.num_ranks", f"only disaggregated engines have ranks of their own; set "
                                  f"rollout.placement=disaggregated or rollout.num_ranks=0 (got {ro.num_ranks})")
    if ro.backend == "hf":
        if ro.tensor_parallel_size != 1:
            fail("rollout.tensor_parallel_size", f"rollout.backend=hf runs one transformers engine per rank; set "
                                                 f"rollout.tensor_parallel_size=1 (got {ro.tensor_parallel_size})")
        if ro.sync_target == "vllm_tp":
            fail("rollout.sync_target", "rollout.backend=hf loads whole HF tensors: use hf_full (or auto)")
        if ro.quantization != "none":
            fail("rollout.quantization", "FP8 rollouts need a vLLM engine; set rollout.backend=vllm or "
                                         "rollout.quantization=none")
    if ro.n_samples_per_prompt < 2:
        fail("rollout.n_samples_per_prompt", f"GRPO needs at least 2 samples per prompt to form a group "
                                             f"advantage, got {ro.n_samples_per_prompt}")
    if ro.temperature < 0:
        fail("rollout.temperature", f"must be >= 0, got {ro.temperature}")
    if not 0 < ro.top_p <= 1:
        fail("rollout.top_p", f"must be in (0, 1], got {ro.top_p}")
    positive("rollout.max_new_tokens", ro.max_new_tokens)
    positive("rollout.max_num_seqs", ro.max_num_seqs)
    if not 0 < ro.gpu_memory_utilization <= 1:
        fail("rollout.gpu_memory_utilization", f"must be in (0, 1], got {ro.gpu_memory_utilization}")
    positive("rollout.sync_bucket_mb", ro.sync_bucket_mb)
    if ro.quantization != "none" and ro.sync_target == "vllm_tp":
        fail("rollout.sync_target", "vllm_tp writes the trainer's weights into vLLM's tensors in place; with "
                                    f"rollout.quantization={ro.quantization} the engine's FP8 weights and scales are "
                                    "loaded by vLLM's own loader: use rollout.sync_target=hf_full (or auto)")
    if ro.max_model_len < ro.max_new_tokens:
        fail("rollout.max_model_len", f"{ro.max_model_len} is shorter than rollout.max_new_tokens="
                                      f"{ro.max_new_tokens}; set it to prompt_max_len + max_new_tokens")


def check_recycle(rc) -> None:
    for name in ("pointwise_prob_mixed", "cot_fraction"):
        v = getattr(rc, name)
        if not 0 <= v <= 1:
            fail(f"algorithm.recycle.{name}", f"is a probability and must be in [0, 1], got {v}")
    for name in ("judge_cap", "reflection_cap"):
        if getattr(rc, name) < 0:
            fail(f"algorithm.recycle.{name}", f"must be >= 0 (0 disables that task), got {getattr(rc, name)}")
    positive("algorithm.recycle.reward_batch_size", rc.reward_batch_size)
    if rc.samples_per_task is not None and rc.samples_per_task < 2:
        fail("algorithm.recycle.samples_per_task", f"GRPO needs at least 2 samples per task to form a group "
                                                   f"advantage, got {rc.samples_per_task}")
    if rc.templates_file is not None and not Path(rc.templates_file).is_file():
        fail("algorithm.recycle.templates_file", f"'{rc.templates_file}' does not exist; give a YAML or JSON "
                                                 f"template file or leave it unset for the built-in templates")


def check_algorithm(alg) -> None:
    if alg.recycle.counterfactual_verdicts and alg.old_logprobs == "engine":
        fail("algorithm.old_logprobs", "a counterfactual verdict is a token the engine never sampled, so it has no "
                                       "engine log-prob to serve as pi_old; set algorithm.old_logprobs=recompute or "
                                       "algorithm.recycle.counterfactual_verdicts=false")
    if alg.max_staleness not in (0, 1):
        fail("algorithm.max_staleness", f"0 (synchronous) or 1 (one-step off-policy), got {alg.max_staleness}")
    if alg.max_staleness and alg.dynamic_sampling:
        fail("algorithm.dynamic_sampling", "refills are generated on demand, which one-step off-policy runs do "
                                           "not do yet; set algorithm.dynamic_sampling=false or max_staleness=0")
    for name in ("eps_clip_low", "eps_clip_high"):
        v = getattr(alg, name)
        if not 0 <= v < 1:
            fail(f"algorithm.{name}", f"must be in [0, 1), got {v}")
    if alg.kl_coef < 0:
        fail("algorithm.kl_coef", f"must be >= 0 (0 disables the KL loss), got {alg.kl_coef}")
    if alg.overlong_penalty_factor < 0:
        fail("algorithm.overlong_penalty_factor", f"must be >= 0, got {alg.overlong_penalty_factor}")
    if alg.dynamic_sampling_rounds < 1:
        fail("algorithm.dynamic_sampling_rounds", f"counts generation rounds per period (the first included) and "
                                                  f"must be >= 1, got {alg.dynamic_sampling_rounds}")
    if not 0 <= alg.answer_rel_tol < 1:
        fail("algorithm.answer_rel_tol", f"is a relative tolerance for numeric answers and must be in [0, 1) "
                                         f"(e.g. 1e-3; 0 = exact), got {alg.answer_rel_tol}")
    if alg.rollout_is_cap < 1:
        fail("algorithm.rollout_is_cap", f"caps the importance ratio pi_old / pi_rollout and must be >= 1, got "
                                         f"{alg.rollout_is_cap}")
    positive("algorithm.reward_timeout_s", alg.reward_timeout_s)
    positive("algorithm.reward_workers", alg.reward_workers)
    check_recycle(alg.recycle)


def check_data(data) -> None:
    if data.train_file is not None and not Path(data.train_file).is_file():
        fail("data.train_file", f"'{data.train_file}' does not exist; give a Spark-format JSON file")
    positive("data.rollout_batch_size", data.rollout_batch_size)
    positive("data.num_episodes", data.num_episodes)
    if data.min_pixels > data.max_pixels:
        fail("data.min_pixels", f"{data.min_pixels} exceeds data.max_pixels={data.max_pixels}")


def check_training(tr) -> None:
    positive("training.lr", tr.lr)
    if not 0 <= tr.min_lr_ratio <= 1:
        fail("training.min_lr_ratio", f"must be in [0, 1], got {tr.min_lr_ratio}")
    if not 0 <= tr.warmup_ratio < 1:
        fail("training.warmup_ratio", f"must be in [0, 1), got {tr.warmup_ratio}")
    positive("training.micro_batch_size", tr.micro_batch_size)
    positive("training.global_batch_size", tr.global_batch_size)
    if tr.global_batch_size % tr.micro_batch_size:
        fail("training.global_batch_size", f"{tr.global_batch_size} is not a multiple of "
                                           f"training.micro_batch_size={tr.micro_batch_size}")
    positive("training.clip_grad", tr.clip_grad)
    positive("training.max_tokens_per_micro_batch", tr.max_tokens_per_micro_batch)
    positive("training.max_steps", tr.max_steps)
    positive("training.max_optimizer_steps", tr.max_optimizer_steps)
    if tr.hang_timeout_s < 0:
        fail("training.hang_timeout_s", f"must be >= 0 seconds (0 turns the watchdog off), got {tr.hang_timeout_s}")
    at_least_zero("training.max_nonfinite_updates", tr.max_nonfinite_updates, "0 = never stop")


def check_checkpoint(ck) -> None:
    positive("checkpoint.save_interval", ck.save_interval)
    positive("checkpoint.keep_last", ck.keep_last)
    at_least_zero("checkpoint.hf_interval", ck.hf_interval, "0 turns the HF export off")
    if ck.hf_interval and ck.dir is None:
        fail("checkpoint.hf_interval", f"hf_interval={ck.hf_interval} writes into checkpoint.dir/hf; set "
                                       f"checkpoint.dir, or checkpoint.hf_interval=0")
    positive("checkpoint.hf_keep_last", ck.hf_keep_last)


def check_logging(lg) -> None:
    at_least_zero("logging.sample_interval", lg.sample_interval, "0 turns samples.jsonl off")


def check_eval(ev) -> None:
    at_least_zero("eval.interval", ev.interval, "0 turns the held-out evaluation off")
    if ev.interval and ev.file is None:
        fail("eval.file", f"eval.interval={ev.interval} needs a held-out file; set eval.file or eval.interval=0")
    if ev.file is not None and not Path(ev.file).is_file():
        fail("eval.file", f"'{ev.file}' does not exist; give a Spark-format file of held-out prompts")
    positive("eval.max_items", ev.max_items)
    at_least_zero("eval.judge_votes", ev.judge_votes, "0: greedy verdicts only")


SECTION_CHECKS: dict[str, Callable] = {
    "model": check_model, "parallel": check_parallel, "rollout": check_rollout, "algorithm": check_algorithm,
    "data": check_data, "training": check_training, "checkpoint": check_checkpoint, "logging": check_logging,
    "eval": check_eval,
}


# --- rules across sections ---------------------------------------------------------------------------------------

def training_world(cfg, world_size: int) -> int:
    """The ranks that train: the whole job, or with disaggregated engines all but `rollout.num_ranks`."""
    ro = cfg.rollout
    return world_size - ro.num_ranks if ro.placement == "disaggregated" else world_size


def layout_rules(cfg, facts: ModelFacts) -> None:
    """The layout against the model: heads, KV heads and layers (layout_rules.py), pipeline stages."""
    par, ro = cfg.parallel, cfg.rollout
    tp, pp, vpp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, \
        par.virtual_pipeline_model_parallel_size
    for knob, why in model_layout_problems(facts, tp, pp, ro.tensor_parallel_size):
        fail(LAYOUT_FIELDS[knob], why)
    if facts.num_layers is not None:
        try:
            stage_layers(facts.num_layers, pp, par.num_layers_in_first_pipeline_stage,
                         par.num_layers_in_last_pipeline_stage)
        except ValueError as e:
            field_name, _, msg = str(e).partition(": ")
            fail(field_name, msg)
    if vpp is not None:
        if facts.num_layers is not None and facts.num_layers % (pp * vpp):
            fail("parallel.virtual_pipeline_model_parallel_size",
                 f"{facts.num_layers} layers do not split into PP*VPP={pp * vpp} equal chunks; pick another VPP")
        if par.num_layers_in_first_pipeline_stage is not None or par.num_layers_in_last_pipeline_stage is not None:
            fail("parallel.virtual_pipeline_model_parallel_size", "uneven first/last pipeline stages with virtual "
                                                                  "stages are not supported; unset one of the two")
    if cfg.training.max_tokens_per_micro_batch is not None and vpp is not None:
        fail("training.max_tokens_per_micro_batch", "token-budget micro-batches with virtual pipeline stages "
                                                    "are not supported yet; unset one of the two")


def placement_rules(cfg) -> None:
    """Modes that need engines of their own."""
    disaggregated = cfg.rollout.placement == "disaggregated"
    if cfg.algorithm.max_staleness and not disaggregated:
        fail("algorithm.max_staleness", "generation overlaps training only on engines of their own: set "
                                        "rollout.placement=disaggregated and rollout.num_ranks, or max_staleness=0")


def world_rules(cfg, world_size: int) -> None:
    """The job's ranks against the layout: the training ranks split into TP x PP x CP groups, the engines' TP."""
    par, ro = cfg.parallel, cfg.rollout
    disaggregated = ro.placement == "disaggregated"
    train_world = training_world(cfg, world_size)
    if disaggregated and train_world < 1:
        fail("rollout.num_ranks", f"leaves no training rank of the job's {world_size}; launch more ranks or "
                                  f"give the engines fewer")
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if train_world % model_parallel:
        what = f"training ranks {train_world} (world {world_size} - rollout.num_ranks {ro.num_ranks})" \
            if disaggregated else f"world size {world_size}"
        fail("parallel", f"{what} is not a multiple of TP*PP*CP={model_parallel}; "
                         f"launch a multiple of {model_parallel} ranks or change the layout")
    if not disaggregated and world_size % ro.tensor_parallel_size:
        fail("rollout.tensor_parallel_size",
             f"world size {world_size} is not a multiple of the rollout TP {ro.tensor_parallel_size}")
    tr = cfg.training
    dp = train_world // model_parallel
    if dp and tr.global_batch_size % (tr.micro_batch_size * dp):
        fail("training.global_batch_size", f"{tr.global_batch_size} is not divisible by micro_batch_size x "
                                           f"data-parallel size = {tr.micro_batch_size} x {dp}")


def batch_rules(cfg) -> None:
    """Lengths and batch sizes that must fit each other across sections."""
    ro, alg, data, tr = cfg.rollout, cfg.algorithm, cfg.data, cfg.training
    if alg.overlong_buffer < 0 or alg.overlong_buffer > ro.max_new_tokens:
        fail("algorithm.overlong_buffer", f"must be in [0, rollout.max_new_tokens={ro.max_new_tokens}] (0 turns "
                                          f"the penalty off), got {alg.overlong_buffer}")
    rc = alg.recycle
    if rc.samples_per_task is not None and rc.reward_batch_size * rc.samples_per_task % tr.global_batch_size:
        fail("algorithm.recycle.samples_per_task", f"the {rc.reward_batch_size * rc.samples_per_task} samples "
                                                   f"of a reward period (reward_batch_size x samples_per_task) "
                                                   f"are not a multiple of training.global_batch_size="
                                                   f"{tr.global_batch_size}")
    if data.prompt_max_len + ro.max_new_tokens > ro.max_model_len:
        fail("rollout.max_model_len", f"{ro.max_model_len} < data.prompt_max_len + rollout.max_new_tokens = "
                                      f"{data.prompt_max_len + ro.max_new_tokens}; raise it or shorten prompts")
    samples = data.rollout_batch_size * ro.n_samples_per_prompt
    if samples % tr.global_batch_size:
        fail("training.global_batch_size", f"the {samples} samples of a rollout batch (rollout_batch_size x "
                                           f"n_samples_per_prompt) are not a multiple of {tr.global_batch_size}")


def cross_section_rules(cfg, world_size: Optional[int], facts: ModelFacts) -> None:
    layout_rules(cfg, facts)
    batch_rules(cfg)
    if world_size is not None:
        world_rules(cfg, world_size)


def validate(cfg, world_size: Optional[int] = None, model: Optional[ModelFacts] = None) -> None:
    """Every section's own rules, then the rules across sections; with the world size and the model's facts
    (`ModelFacts.of(shape)`) the layout rules too. The first broken rule raises, naming its field and the fix;
    a mode the engines' placement does not run is said first (fixing a detail of it would be wasted)."""
    placement_rules(cfg)
    for name, check in SECTION_CHECKS.items():
        check(getattr(cfg, name))
    cross_section_rules(cfg, world_size, model or ModelFacts())
