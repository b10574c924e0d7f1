"""Moving weights between HF safetensors and in-memory megatron-core models, one tensor at a time.

`HFCheckpoint` (io/safetensors.py) reads a safetensors directory lazily and turns every way it can be
broken (missing shard, truncated file, missing tensor) into an error naming the file. `load_hf_into_megatron` fills this
rank's shards; `megatron_named_params` yields (global megatron name, param) so that PP stages agree on layer ids.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import Tensor

from megatron_spark.io.safetensors import HFCheckpoint
from megatron_spark.mapping.table import ParamMap, WeightMap, from_te_name

__all__ = ["HFCheckpoint", "load_hf_into_megatron", "megatron_named_params", "export_megatron_to_hf", "read_shard"]


def _layer_prefixes(model: torch.nn.Module) -> dict[str, str]:
    """Local module prefix of every TransformerLayer -> the same prefix with its global layer index."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TransformerLayer):
            glob = re.sub(r"layers\.\d+$", f"layers.{mod.layer_number - 1}", name)
            out[name + "."] = glob + "."
    return out


def megatron_named_params(model: torch.nn.Module, include_buffers: bool = False) -> Iterator[tuple[str, Tensor]]:
    """(global local-spec name, tensor) for every parameter of a model chunk."""
    prefixes = _layer_prefixes(model)
    items = list(model.named_parameters())
    for name, p in items:
        if name.startswith("module."):
            name = name[len("module."):]
        for local, glob in prefixes.items():
            if name.startswith(local):
                name = glob + name[len(local):]
                break
        yield from_te_name(name), p


def read_shard(pm: ParamMap, ckpt: HFCheckpoint, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's shard of one Megatron parameter, assembled from exactly the HF slices it needs."""
    t = pm.transform
    dim = 1 if t.tp_dim == 1 else 0
    hf_rows = [ckpt.shape(n)[dim] for n in pm.hf]
    pieces = []
    for run in t.shard_runs(pm.hf, hf_rows, tp_rank, tp_size):
        if run.hf is None:  # vocabulary padding: zeros of the checkpoint's dtype
            shape = list(ckpt.shape(pm.hf[0]))
            shape[dim] = run.length
            pieces.append(ckpt.read_rows(pm.hf[0], dim, 0, 0).new_zeros(shape))
        else:
            pieces.append(ckpt.read_rows(run.hf, dim, run.hf_start, run.length))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


@torch.no_grad()
def load_hf_into_megatron(chunks: list[torch.nn.Module], wmap: WeightMap, ckpt: HFCheckpoint,
                          tp_rank: int, tp_size: int) -> int:
    """Copy HF weights into this rank's model chunks, reading only this rank's slices. Returns params filled."""
    n = 0
    for chunk in chunks:
        for name, param in megatron_named_params(chunk):
            shard = read_shard(wmap[name], ckpt, tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"'{name}': mapped shard {tuple(shard.shape)} != parameter {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
            n += 1
    return n


def gather_tp(t: Tensor, group) -> list[Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def export_megatron_to_hf(chunks: list[torch.nn.Module], wmap: WeightMap, tp_group, grads: bool = False,
                          ) -> dict[str, Tensor]:
    """HF tensors of this pipeline stage (weights, or their gradients), TP-gathered. For tests and small models;
    checkpoint export streams instead (tools/convert)."""
    out: dict[str, Tensor] = {}
    for chunk in chunks:
        for name, p in megatron_named_params(chunk):
            t = p.main_grad if grads and hasattr(p, "main_grad") else (p.grad if grads else p.data)
            if t is None:
                continue
            pm = wmap[name]
            full = pm.transform.unshard(gather_tp(t, tp_group))
            # Tied embeddings: the gradients of the embedding and of an output-layer copy add up, as in HF.
            for k, v in pm.to_hf(full).items():
                out[k] = out[k] + v if k in out else v
    return out
