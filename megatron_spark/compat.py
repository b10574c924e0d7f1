"""Every megatron-core version difference (0.16.1 .. 0.19.x) lives here and nowhere else."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False  # TE's import fails without CUDA libraries; never try on CPU
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # pragma: no cover - GPU only
        return False


def gpt_layer_spec(use_te: bool, normalization: str = "RMSNorm", qk_layernorm: bool = False):
    """The GPT decoder layer spec: TE fused layers on GPU, megatron-core's local modules on CPU."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)


def transformer_config_kwargs(**kwargs) -> dict:
    """Drop TransformerConfig fields this megatron-core does not know (fields were added across versions)."""
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {k: v for k, v in kwargs.items() if k in known}


def initialize_model_parallel(**kwargs) -> None:
    from megatron.core import parallel_state

    params = inspect.signature(parallel_state.initialize_model_parallel).parameters
    parallel_state.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in params})


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
