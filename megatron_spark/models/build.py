"""Build a model's Megatron chunks for this rank, whatever its family (the family builds each pipeline stage).

Also where a build decides its device and whether Transformer Engine is used.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

import torch

from megatron_spark import compat
from megatron_spark.models.hf_config import ModelShape

# Set by build_model while it builds for a device other than the GPU (the converters' meta models, CPU tools): with
# use_cpu_initialization=False megatron-core passes device=cuda to every parameter explicitly, which overrides a
# `torch.device("meta")` context, so a "meta" 32B model would allocate ~131 GB of real GPU memory.
BUILD_OFF_GPU: ContextVar[bool] = ContextVar("build_off_gpu", default=False)


def default_device() -> torch.device:
    """Where this process's model runs: its current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_TE_WARNED = False


def use_transformer_engine(impl: str = "auto") -> bool:
    """`model.transformer_impl`: local -> False; transformer_engine -> True, or an error that carries TE's import
    error; auto -> TE when it imports, else the local spec, and on a GPU one warning with the import error (the
    local spec's unfused attention is several times slower and needs more memory than the planner assumes)."""
    global _TE_WARNED
    if impl == "local":
        return False
    if impl not in ("auto", "transformer_engine"):
        raise ValueError(f"config field 'model.transformer_impl': unknown value {impl!r}; use auto, "
                         f"transformer_engine or local")
    error = compat.transformer_engine_error()
    if impl == "transformer_engine" and error:
        raise ValueError(f"config field 'model.transformer_impl': transformer_engine was asked for but does not "
                         f"import ({error}); install it (docs/gpu.md) or set model.transformer_impl=local")
    if error and torch.cuda.is_available() and not _TE_WARNED:
        import sys

        import torch.distributed as dist

        _TE_WARNED = True
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"warning: Transformer Engine does not import ({error}); using megatron-core's local spec "
                  f"(unfused attention: slower, more activation memory). Set model.transformer_impl=local to "
                  f"silence this, or transformer_engine to make it an error.", file=sys.stderr, flush=True)
    return error is None


def build_model(shape: ModelShape, layout, *, dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None,
                transformer_impl: str = "auto", make_vocab_size_divisible_by: int = 128, recompute="none",
                device: Optional[torch.device | str] = None) -> list[torch.nn.Module]:
    """The model chunks of this rank (one per virtual pipeline stage) for the initialised parallel state, every
    parameter and buffer on `device` (default: `default_device()`). megatron-core moves parameters to the GPU only
    for DDP with the distributed optimizer; a frozen reference model or a verify tool would otherwise keep the CPU
    parameters it creates (the patch embedding, torch norms) next to CUDA activations."""
    if use_te is None:
        use_te = use_transformer_engine(transformer_impl)
    target = torch.device(device) if device is not None else default_device()
    token = BUILD_OFF_GPU.set(target.type != "cuda")  # (parameters made where they go, never on the GPU first)
    try:
        chunks = _build_chunks(shape, layout, dtype, use_te, make_vocab_size_divisible_by, recompute)
    finally:
        BUILD_OFF_GPU.reset(token)
    mark_tensor_parallel_params(chunks, shape, layout.tp, make_vocab_size_divisible_by)
    return [c.to(target) for c in chunks]


def _build_chunks(shape: ModelShape, layout, dtype: torch.dtype, use_te: bool, make_vocab_size_divisible_by: int,
                  recompute) -> list[torch.nn.Module]:
    from megatron.core import parallel_state as ps

    chunks = []
    vpp = layout.vpp or 1
    for vp in range(vpp):
        vp_stage = vp if layout.vpp else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage) if layout.vpp \
            else ps.is_pipeline_first_stage()
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage) if layout.vpp \
            else ps.is_pipeline_last_stage()
        common = dict(dtype=dtype, use_te=use_te, pre_process=first, post_process=last, vp_stage=vp_stage,
                      make_vocab_size_divisible_by=make_vocab_size_divisible_by, recompute=recompute)
        chunks.append(shape.kind.build_stage(shape, layout, **common))
    return chunks


def mark_tensor_parallel_params(chunks: list[torch.nn.Module], shape: ModelShape, tp: int,
                                make_vocab_size_divisible_by: int = 128) -> None:
    """Tag every TP-sharded weight with megatron-core's `tensor_model_parallel` / `partition_dim` attributes.

    megatron-core sets them only while it initialises weights (`perform_initialization`), which we skip (the weights
    come from a checkpoint). Untagged, a sharded weight counts as a TP duplicate: the optimizer leaves it out of the
    gradient norm on every TP rank but the first, so gradient clipping would depend on the TP size."""
    from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes

    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.weights import megatron_named_params

    wmap = WeightMap(shape, make_vocab_size_divisible_by, tp=tp)
    for chunk in chunks:
        for name, p in megatron_named_params(chunk):
            dim = wmap[name].transform.tp_dim
            if dim is not None and tp > 1:
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
            set_defaults_if_not_set_tensor_model_parallel_attributes(p)
