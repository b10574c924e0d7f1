"""Per-GPU memory of one SPARK step, per pipeline stage and per phase, from the model's exact parameter counts.

Static terms (exact; `tests/dist` compares them with the live trainer's tensors):
    params    n x dtype bytes (bf16 2, fp32 4)
    grads     n x 4 (megatron-core DDP reduces into fp32 grad buffers)
    optimizer n x (4 fp32 master copy unless the params are fp32 + 8 Adam moments), divided by DP with the
              distributed optimizer (plus its bucket padding, at most lcm(DP, 128) per bucket)
    reference n x dtype bytes when the KL term needs the reference model on the GPU

Activation terms (per micro-batch of s tokens, bytes per transformer layer, bf16; our derivation for Qwen's SwiGLU
and GQA with no dropout, after Korthikanti et al. 2022):
    replicated over TP (each TP rank keeps them whole unless sequence parallel): 8sh
        (the inputs of the two norms and of the two residual adds)
    split over TP: 2s(q + 2kv) QKV + 2sh attention output + 6s*ffn (fc1 output and SwiGLU output)
        + attention core: flash 4*s*heads (fp32 log-sum-exp) | unfused 4*heads*s^2 (scores and softmax, bf16)
    selective recompute drops the attention core; full recompute keeps 2sh per layer plus one layer whole.
    A stage holds min(PP - stage, micro-batches) micro-batches in flight (1F1B); the last stage adds the fp32
    log-prob/loss tensors 10 s V/TP (bf16 logits, fp32 logits, the softmax gradient) and the backward's bf16
    weight-gradient of the output layer; the vision tower's activations (4 patches per image token) sit on stage 0.
The remainder (allocator fragmentation, CUDA context, communication buffers, workspaces) is one calibrated constant,
`OVERHEAD_GIB`, fitted to the GPU measurements in `calibration.py`.

Phases: `train` (the engine asleep: vLLM's weights on the host, its KV cache freed, ~`ENGINE_ASLEEP_GIB` left) and
`rollout` (the trainer's static state stays on the GPU next to vLLM's weights at rollout TP and its KV cache).
vLLM does not reserve KV for every sequence: it runs as many at once as its KV budget holds. So the KV cache is what
the most loaded GPU leaves free, capped by what `max_num_seqs` full-length sequences need; the concurrency it allows
sets the rollout time, and a layout is infeasible only when not even one sequence fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import Optional

from megatron_spark.models.hf_config import ModelShape
from megatron_spark.dtypes import BYTES as DTYPE_BYTES
from megatron_spark.planner.model import StageParams, kv_bytes_per_token, param_counts, stage_params

GIB = 2 ** 30
OVERHEAD_GIB = 3.4          # fitted (least relative error) to the bench/mfu.py peaks in calibration.py
MARGIN = 0.05  # of each GPU left free in every phase (communicators, fragmentation, CUDA graphs)
ENGINE_ASLEEP_GIB = 0.5     # vLLM's buffers a level-1 sleep keeps (assumption, not measured here)
ENGINE_AWAKE_GIB = 1.5      # vLLM's activations / sampler / graphs besides weights and KV (assumption)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rollout_tp: int = 1
    recompute: str = "none"                 # none | selective | full
    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    reference_on_gpu: bool = True           # the KL term's reference model (off: offloaded or kl_coef = 0)
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    freeze: tuple[str, ...] = ()            # model.freeze: frozen elements get no gradient and no optimizer state

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} rTP{self.rollout_tp} "
                f"{'recompute=' + self.recompute if self.recompute != 'none' else 'no recompute'}"
                f"{'' if self.distributed_optimizer else ' no-dist-opt'}")


@dataclass(frozen=True)
class Workload:
    prompts: int = 64                       # task prompts per step (the infer period)
    reward_prompts: int = 64                # recycled tasks per step (the reward period; 0 for plain GRPO)
    n_samples: int = 8
    prompt_len: int = 1024                  # text tokens of a prompt
    image_tokens: int = 0                   # LLM tokens per image (4 vision patches each)
    response_len: int = 1024
    micro_batch_size: int = 1
    global_batch: Optional[int] = None      # sequences per optimizer step (default: one step per period)
    max_num_seqs: int = 256                 # vLLM's concurrent sequences per engine
    dtype: str = "bf16"
    attention: str = "flash"                # flash (TE / flash-attn, the GPU default) | unfused (local spec)
    old_logprobs: str = "recompute"         # algorithm.old_logprobs: recompute (no pass for a period's first
                                            # optimizer step) | engine (no pass at all)
    # vLLM's share of each GPU (rollout.gpu_memory_utilization): it takes the whole share, its KV cache being what
    # its weights leave; None (a search over layouts): the KV cache fills what the trainer leaves free
    gpu_memory_utilization: Optional[float] = None

    def old_pass_share(self) -> float:
        """Share of a period's samples that need the old-log-prob forward pass: none under `engine`; under
        `recompute` all but the first global batch's (which trains at exactly those weights)."""
        if self.old_logprobs == "engine":
            return 0.0
        per_period = self.prompts * self.n_samples
        return max(0.0, 1.0 - (self.global_batch or per_period) / per_period)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.image_tokens + self.response_len

    def micro_batches(self, dp: int) -> int:
        gb = self.global_batch or self.prompts * self.n_samples
        return max(1, gb // (self.micro_batch_size * dp))


@dataclass
class StageMemory:
    stage: int
    params: float
    grads: float
    optimizer: float
    reference: float
    activations: float
    logits: float
    vllm_weights: float
    kv_cache: float
    overhead: float = OVERHEAD_GIB * GIB
    concurrency: int = 0                    # sequences one engine runs at once within its KV cache
    parts: dict = field(default_factory=dict)

    @property
    def static(self) -> float:
        return self.params + self.grads + self.optimizer + self.reference

    @property
    def train(self) -> float:
        return self.static + self.activations + self.logits + self.overhead + ENGINE_ASLEEP_GIB * GIB

    @property
    def rollout(self) -> float:
        return self.static + self.vllm_weights + self.kv_cache + ENGINE_AWAKE_GIB * GIB + self.overhead

    @property
    def peak(self) -> float:
        return max(self.train, self.rollout)

    @property
    def peak_phase(self) -> str:
        return "train" if self.train >= self.rollout else "rollout"


def state_bytes(n: int, dtype: str, dp: int, distributed_optimizer: bool, buckets: int = 0) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes of n parameters on one rank. With the distributed optimizer, `buckets`
    adds megatron-core's padding of each bucket to a multiple of lcm(DP, 128) (an upper bound)."""
    b = DTYPE_BYTES[dtype]
    master = 0 if dtype == "fp32" else 4
    opt = n * (master + 8)
    if distributed_optimizer:
        lcm = dp * 128 // gcd(dp, 128)
        opt = (n + buckets * lcm) * (master + 8) // dp
    return n * b, n * 4, opt


def layer_activation_bytes(h: int, ffn: int, heads: int, kv_heads: int, head_dim: int, s: int, tp: int,
                           attention: str, recompute: str, sequence_parallel: bool) -> float:
    q, kv = heads * head_dim, kv_heads * head_dim
    replicated = 8 * s * h
    core = 4 * s * heads if attention == "flash" else 4 * heads * s * s
    if recompute == "selective":
        core = 0
    split = 2 * s * (q + 2 * kv) + 2 * s * h + 6 * s * ffn + core
    return (replicated / tp if sequence_parallel else replicated) + split / tp


def plan_memory(shape: ModelShape, layout: Layout, work: Workload, gpu_bytes: float = float("inf")
                ) -> list[StageMemory]:
    t, v = shape.text, shape.vision
    stages: list[StageParams] = stage_params(shape, layout.tp, layout.pp, layout.first_stage_layers,
                                             layout.last_stage_layers, freeze=layout.freeze)
    s, mb = work.seq_len * work.micro_batch_size, work.micro_batches(layout.dp)
    per_layer = layer_activation_bytes(t.hidden_size, t.ffn_hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                                       s, layout.tp, work.attention, layout.recompute, layout.sequence_parallel)
    full_layer = layer_activation_bytes(t.hidden_size, t.ffn_hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                                        s, layout.tp, work.attention, "none", layout.sequence_parallel)
    from megatron_spark.mapping.transforms import padded_vocab_size

    vocab = padded_vocab_size(t.vocab_size, 128, layout.tp)
    total = param_counts(shape).total
    b = DTYPE_BYTES[work.dtype]
    vllm_weights = total * b / layout.rollout_tp
    engines = max(1, layout.gpus // layout.rollout_tp)
    seqs = min(work.max_num_seqs, -(-(work.prompts + work.reward_prompts) * work.n_samples // engines))
    per_seq = work.seq_len * kv_bytes_per_token(shape, layout.rollout_tp, b)
    out = []
    for st in stages:
        params, grads, opt = state_bytes(st.total, work.dtype, layout.dp, layout.distributed_optimizer)
        if st.frozen:  # frozen elements: parameters only (no fp32 gradient, no master copy or Adam moments)
            _, grads, opt = state_bytes(st.total - st.frozen, work.dtype, layout.dp, layout.distributed_optimizer)
        inflight = min(layout.pp - st.stage, mb)
        if layout.recompute == "full":
            acts = inflight * st.layers * 2 * s * t.hidden_size / (layout.tp if layout.sequence_parallel else 1) \
                + full_layer
        else:
            acts = inflight * st.layers * per_layer
        if st.stage == 0 and v is not None and work.image_tokens:
            patches = 4 * work.image_tokens * work.micro_batch_size
            vis = layer_activation_bytes(v.hidden_size, v.ffn_hidden_size, v.num_heads, v.num_heads,
                                         v.hidden_size // v.num_heads, patches, layout.tp, work.attention,
                                         layout.recompute, False)
            acts += inflight * v.depth * (vis if layout.recompute != "full" else 2 * patches * v.hidden_size)
        # the inputs of the micro-batches in flight (one moves to the GPU when its step runs): token ids, labels,
        # positions, the dense [b, 1, s, s] boolean mask, and the pixels (model dtype) on stage 0
        inputs = inflight * (work.micro_batch_size * work.seq_len ** 2 + 40 * s)
        if st.stage == 0 and v is not None and work.image_tokens:
            inputs += inflight * 4 * work.image_tokens * work.micro_batch_size * 3 * 2 * 14 * 14 * DTYPE_BYTES[
                work.dtype]
        acts += inputs
        logits = 0.0
        if st.stage == layout.pp - 1:
            logits = 10 * s * vocab / layout.tp + 2 * vocab * t.hidden_size / layout.tp
        out.append(StageMemory(st.stage, params, grads, opt, params if layout.reference_on_gpu else 0.0, acts,
                               logits, vllm_weights, 0.0, parts={"layers": st.layers, "params_per_rank": st.total}))
    if work.gpu_memory_utilization is not None and gpu_bytes != float("inf"):
        # vLLM allocates its whole share at start: weights, working memory, and a KV cache of the rest
        pool = max(0.0, work.gpu_memory_utilization * gpu_bytes - vllm_weights - ENGINE_AWAKE_GIB * GIB)
        concurrency = int(min(seqs, pool / per_seq))
        for m in out:
            m.concurrency, m.kv_cache = concurrency, pool
        return out
    # (vLLM sized to leave the margin `megatron-spark train` keeps free: the KV cache fills the rest)
    free = (1 - MARGIN) * gpu_bytes - max(m.static for m in out) - vllm_weights - \
        (ENGINE_AWAKE_GIB + OVERHEAD_GIB) * GIB
    concurrency = int(max(0.0, min(seqs, free / per_seq)))
    for m in out:
        m.concurrency, m.kv_cache = concurrency, concurrency * per_seq
    return out


def infeasible_reason(mem: list[StageMemory], limit_bytes: float, layout: Layout) -> Optional[str]:
    worst = max(mem, key=lambda m: m.peak)
    g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    if worst.concurrency < 1:
        worst = max(mem, key=lambda m: m.static)
        fix = ["spread the trainer over more GPUs (PP, or DP with the distributed optimizer)"]
        if layout.reference_on_gpu:
            fix.append("offload the reference model")
        if layout.rollout_tp < 8:
            fix.append("raise the rollout TP")
        return (f"rollout: stage {worst.stage}'s trainer state {g(worst.static)} GiB + vLLM weights "
                f"{g(worst.vllm_weights)} GiB leave no room for one sequence's KV cache in {g(limit_bytes)} GiB; "
                + ", or ".join(fix))
    if worst.peak <= (1 - MARGIN) * limit_bytes:  # (the margin `megatron-spark train` keeps: planner/fit.py)
        return None
    head = (f"stage {worst.stage} needs {g(worst.peak)} GiB > {g((1 - MARGIN) * limit_bytes)} GiB "
            f"({1 - MARGIN:.0%} of {g(limit_bytes)}) in {worst.peak_phase}")
    if worst.peak_phase == "rollout":
        return (f"{head}: trainer state {g(worst.static)}, vLLM weights {g(worst.vllm_weights)}, KV cache "
                f"{g(worst.kv_cache)}; raise the rollout TP, lower max_num_seqs, or shard the trainer more")
    fix = []
    if worst.activations + worst.logits > worst.static / 2:
        if layout.recompute != "full":
            fix.append("recompute=full")
        fix.append(f"PP={layout.pp * 2}")
    else:
        fix.append(f"TP={layout.tp * 2} or PP={layout.pp * 2}")
        if not layout.distributed_optimizer:
            fix.append("the distributed optimizer")
    return (f"{head}: static {g(worst.static)} (params {g(worst.params)}, grads {g(worst.grads)}, optimizer "
            f"{g(worst.optimizer)}, reference {g(worst.reference)}), activations {g(worst.activations)}, logits "
            f"{g(worst.logits)}; use {' or '.join(fix)}")
