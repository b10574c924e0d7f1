"""Every megatron-core version difference (0.16.1 .. 0.19.x) lives here and nowhere else."""
from __future__ import annotations

import dataclasses
import inspect

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
