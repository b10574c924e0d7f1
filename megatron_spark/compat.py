"""Every megatron-core version difference (0.16.1 .. 0.19.x) lives here and nowhere else."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch


def transformer_engine_error() -> Optional[str]:
    """Why Transformer Engine cannot be used here (None when it imports). Every exception counts: a TE built
    against another torch or flash-attn fails with OSError / RuntimeError / ImportError alike, and the caller
    decides whether that is a warning (`model.transformer_impl: auto`) or an error (`transformer_engine`)."""
    if not torch.cuda.is_available():
        return "no CUDA device (Transformer Engine runs on GPUs only)"  # its import fails without CUDA libraries
    try:
        import transformer_engine.pytorch  # noqa: F401
        return None
    except Exception as e:  # pragma: no cover - GPU only
        return f"{type(e).__name__}: {e}"


def have_transformer_engine() -> bool:
    return transformer_engine_error() is None


def gpt_layer_spec(use_te: bool, normalization: str = "RMSNorm", qk_layernorm: bool = False, norm_cls=None):
    """The GPT decoder layer spec: TE fused layers on GPU, megatron-core's local modules on CPU (with `norm_cls`
    for its norms when given: the two per layer, and the per-head query and key norms with `qk_layernorm`)."""
    import copy

    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    if norm_cls is not None:
        spec = copy.deepcopy(spec)
        spec.submodules.input_layernorm = norm_cls
        spec.submodules.pre_mlp_layernorm = norm_cls
        if qk_layernorm:
            spec.submodules.self_attention.submodules.q_layernorm = norm_cls
            spec.submodules.self_attention.submodules.k_layernorm = norm_cls
    return spec


def local_block_spec(layer_spec, config, norm_cls, vp_stage: Optional[int] = None):
    """The decoder block of the local spec with `norm_cls` as its final norm. megatron-core picks the final norm
    itself otherwise: TE's when TE imports, else Apex's FusedLayerNorm when Apex is installed, which asserts on
    RMSNorm ("RMSNorm is not supported in FusedLayerNorm") -- the node with Apex and a broken TE would crash."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=norm_cls)


def transformer_config_kwargs(**kwargs) -> dict:
    """Drop TransformerConfig fields this megatron-core does not know (fields were added across versions)."""
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {k: v for k, v in kwargs.items() if k in known}


def initialize_model_parallel(**kwargs) -> None:
    from megatron.core import parallel_state

    params = inspect.signature(parallel_state.initialize_model_parallel).parameters
    parallel_state.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in params})


def prepare_optimizer_for_loading(optimizer) -> None:
    """megatron-core's chained optimizer over torch Adam (the CPU path) has no state tensors before its first step,
    so there is nothing for a checkpoint to load into; its private helper creates placeholder states (the
    distributed optimizer initialises its own when loading)."""
    for o in getattr(optimizer, "chained_optimizers", []):
        if hasattr(o, "_init_optimizer_states_with_dummy_values"):
            o._init_optimizer_states_with_dummy_values()


def checkpoint_writer_queue(initializer=None) -> Optional[int]:
    """megatron-core's torch_dist writer returns its results through a queue served by a `multiprocessing` Manager
    process, which it starts (spawn) at the first save and keeps for the life of the trainer. Start that Manager
    here instead, with `initializer` run in it (helpers/lifetime: survive the job's signals), and return its pid
    for the reaper; None on megatron-core versions without that module-level queue."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return None
    if not hasattr(fa, "_results_queue"):
        return None
    if fa._results_queue is None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=initializer)
        fa._results_queue = manager.Queue()  # the proxy keeps the manager (and so its process) alive
    proc = getattr(getattr(fa._results_queue, "_manager", None), "_process", None)
    return proc.pid if proc is not None else None


def async_calls_queue():
    """megatron-core's queue of asynchronous checkpoint saves, with a fresh forked writer per save: the fork is the
    snapshot (CPU tensors that own their storage are written by reference, so the fork's copy-on-write pages are
    what keeps the next optimizer step out of the checkpoint). The persistent worker is not used: it calls
    torch.cuda.set_device in its own process and dies without a GPU, leaving the trainer waiting for it."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def save_async(state: dict, directory: str):
    """dist_checkpointing.save(..., async_sharded_save=True) -> its AsyncRequest. megatron-core 0.19 defaults the
    async strategy to NVIDIA Resiliency Extension's ("nvrx"), which clusters may not have: ask for its own."""
    import inspect

    from megatron.core import dist_checkpointing

    extra = {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters \
        else {}
    return dist_checkpointing.save(state, directory, async_sharded_save=True, **extra)


def async_writer_pids(queue) -> list[int]:
    """The processes writing the saves in flight (for the reaper: none outlives a killed trainer)."""
    pids = []
    for call in getattr(queue, "async_calls", []):
        proc = getattr(call.async_caller, "process", None)
        if proc is not None and proc.pid is not None:
            pids.append(proc.pid)
    return pids


def nccl_options(timeout):
    """NCCL process-group options carrying `timeout` (torch exposes it only as the private `_timeout`; without it an
    NCCL group made directly keeps NCCL's 10-minute default, whatever its gloo sibling is given)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return opts
