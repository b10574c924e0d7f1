"""Moving weights between HF safetensors and in-memory megatron-core models, one tensor at a time.

`HFCheckpoint` reads a (sharded) safetensors directory lazily through mmap and turns every way it can be broken
(missing shard, truncated file, missing tensor) into an error naming the file. `load_hf_into_megatron` fills this
rank's shards; `megatron_named_params` yields (global megatron name, param) so that PP stages agree on layer ids.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from megatron_spark.mapping.qwen import ParamMap, WeightMap, canonical_hf_name, from_te_name


class HFCheckpoint:
    """Lazy reader of an HF safetensors checkpoint (single file or index + shards)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"'{index}' is not a valid safetensors index ({e})") from e
        elif single.is_file():
            weight_map = None
        else:
            raise ValueError(f"'{self.dir}' has neither model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        self._handles = {}
        self._where: dict[str, str] = {}
        self._raw_names: dict[str, str] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                raise ValueError(f"shard '{path}' is named in the index but missing; re-download or re-export it")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ValueError(f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}") from e
            self._check_size(path, h)
            self._handles[fname] = h
            for k in h.keys():
                self._where[canonical_hf_name(k)] = fname
                self._raw_names[canonical_hf_name(k)] = k

    @staticmethod
    def _check_size(path: Path, handle) -> None:
        """A truncated file still opens (the header is intact); compare its size with the header's end offset."""
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        actual = path.stat().st_size
        if actual < 8 + header_len + end:
            raise ValueError(f"'{path}' is truncated: {actual} bytes on disk, its header needs "
                             f"{8 + header_len + end}; re-download or re-export it")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(self._raw_names[name]).get_shape())

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise ValueError(f"tensor '{name}' is missing from the checkpoint in '{self.dir}'")
        return self._handles[self._where[name]].get_tensor(self._raw_names[name])

    def read_rows(self, name: str, dim: int, start: int, length: int) -> Tensor:
        """Rows [start, start+length) along `dim` (0 or 1) of one tensor, read through mmap without the rest."""
        if name not in self._where:
            raise ValueError(f"tensor '{name}' is missing from the checkpoint in '{self.dir}'")
        sl = self._handles[self._where[name]].get_slice(self._raw_names[name])
        return sl[start:start + length] if dim == 0 else sl[:, start:start + length]



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
