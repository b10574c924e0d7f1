"""Typed two-way transforms between HF tensors and megatron-core's logical (unsharded) tensors.

A megatron "full" tensor here is exactly what dist-checkpointing stores as the global tensor: QKV interleaved per
query group, SwiGLU fc1 as [gate; up], vocabulary rows padded. `shard`/`unshard` give the in-memory TP layout,
which differs from a plain chunk only for the fused gate/up weight (each rank holds [gate_r; up_r]).

Every transform also describes itself as row `Segment`s of dim 0 (which rows of which HF tensor land where), so
the resharding bridge can plan shard-to-shard transfers without materialising any full tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """Rows [mg_start, mg_start+length) of the megatron full tensor are rows [hf_start, ...) of HF tensor `hf_index`.

    `hf_index` None marks padding rows (vocab padding) that have no HF source.
    """
    mg_start: int
    length: int
    hf_index: Optional[int]
    hf_start: int


@dataclass(frozen=True)
class Run:
    """`length` rows of HF tensor `hf` from `hf_start`, at offset `offset` of a shard (hf None: zero padding).

    "Rows" are along the shard dimension: dim 1 for row-parallel weights, dim 0 otherwise.
    """
    offset: int
    hf: Optional[str]
    hf_start: int
    length: int


class Transform:
    """Identity by default. `tp_dim`: dimension split over TP ranks (0 column-, 1 row-parallel, None replicated)."""

    num_hf: int = 1

    def __init__(self, tp_dim: Optional[int] = None):
        self.tp_dim = tp_dim

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        return t

    def to_hf(self, full: Tensor) -> list[Tensor]:
        return [full]

    def shard(self, full: Tensor, rank: int, size: int) -> Tensor:
        if self.tp_dim is None or size == 1:
            return full
        if full.shape[self.tp_dim] % size:
            raise ValueError(f"dim {self.tp_dim} of size {full.shape[self.tp_dim]} is not divisible by TP={size}")
        return full.chunk(size, dim=self.tp_dim)[rank]

    def unshard(self, shards: Sequence[Tensor]) -> Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)

    def segments(self, hf_rows: Sequence[int]) -> list[Segment]:
        """Dim-0 row map of the full tensor, given the row counts of the HF tensors."""
        return [Segment(0, hf_rows[0], 0, 0)]

    def shard_runs(self, hf_names: Sequence[str], hf_rows: Sequence[int], rank: int, size: int) -> list[Run]:
        """The HF row runs that make up TP rank `rank`'s in-memory shard, in order: `shard()` without tensors.

        The loader reads exactly these slices and the bridge planner intersects them with vLLM's shards, so neither
        ever builds a full tensor.
        """
        segs = self.segments(hf_rows)
        total = sum(s.length for s in segs)
        lo, hi = (0, total) if self.tp_dim is None else (rank * total // size, (rank + 1) * total // size)
        runs = []
        for s in segs:
            a, b = max(lo, s.mg_start), min(hi, s.mg_start + s.length)
            if a < b:
                hf = hf_names[s.hf_index] if s.hf_index is not None else None
                runs.append(Run(a - lo, hf, s.hf_start + (a - s.mg_start), b - a))
        return runs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tp_dim={self.tp_dim})"


class QKVInterleave(Transform):
    """HF q/k/v (separate, or one fused [q; k; v] as in the vision tower) <-> megatron per-group interleave.

    Megatron orders linear_qkv rows as, for each query group g: the g-th group's query heads, then its key head,
    then its value head. Each TP rank owns whole groups, so a plain dim-0 chunk is the TP shard.
    """

    def __init__(self, num_heads: int, num_groups: int, head_dim: int, fused_hf: bool = False):
        super().__init__(tp_dim=0)
        if num_heads % num_groups:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_query_groups={num_groups}")
        self.h, self.g, self.d, self.fused_hf = num_heads, num_groups, head_dim, fused_hf
        self.num_hf = 1 if fused_hf else 3

    def _split_hf(self, hf: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused_hf:
            (qkv,) = hf
            q, k, v = qkv.split([self.h * self.d, self.g * self.d, self.g * self.d], dim=0)
            return q, k, v
        q, k, v = hf
        return q, k, v

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        q, k, v = self._split_hf(hf)
        rest = q.shape[1:]
        qpg = self.h // self.g
        q = q.reshape(self.g, qpg * self.d, *rest)
        k = k.reshape(self.g, self.d, *rest)
        v = v.reshape(self.g, self.d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, full: Tensor) -> list[Tensor]:
        rest = full.shape[1:]
        qpg = self.h // self.g
        grouped = full.reshape(self.g, (qpg + 2) * self.d, *rest)
        q, k, v = grouped.split([qpg * self.d, self.d, self.d], dim=1)
        q, k, v = (t.reshape(-1, *rest) for t in (q, k, v))
        if self.fused_hf:
            return [torch.cat([q, k, v], dim=0)]
        return [q, k, v]

    def segments(self, hf_rows: Sequence[int]) -> list[Segment]:
        qpg, d = self.h // self.g, self.d
        q_idx, k_idx, v_idx = (0, 0, 0) if self.fused_hf else (0, 1, 2)
        k_base = self.h * d if self.fused_hf else 0
        v_base = (self.h + self.g) * d if self.fused_hf else 0
        segs, row = [], 0
        for g in range(self.g):
            segs.append(Segment(row, qpg * d, q_idx, g * qpg * d))
            row += qpg * d
            segs.append(Segment(row, d, k_idx, k_base + g * d))
            row += d
            segs.append(Segment(row, d, v_idx, v_base + g * d))
            row += d
        return segs

    def __repr__(self) -> str:
        return f"QKVInterleave(heads={self.h}, groups={self.g}, head_dim={self.d}, fused_hf={self.fused_hf})"


class GateUpFuse(Transform):
    """HF gate_proj, up_proj <-> megatron SwiGLU linear_fc1 = [gate; up]; TP rank r holds [gate_r; up_r]."""

    num_hf = 2

    def __init__(self):
        super().__init__(tp_dim=0)

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, full: Tensor) -> list[Tensor]:
        return list(full.chunk(2, dim=0))

    def shard(self, full: Tensor, rank: int, size: int) -> Tensor:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)

    def unshard(self, shards: Sequence[Tensor]) -> Tensor:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)

    def segments(self, hf_rows: Sequence[int]) -> list[Segment]:
        return [Segment(0, hf_rows[0], 0, 0), Segment(hf_rows[0], hf_rows[1], 1, 0)]

    def shard_runs(self, hf_names: Sequence[str], hf_rows: Sequence[int], rank: int, size: int) -> list[Run]:
        g, u = hf_rows[0] // size, hf_rows[1] // size
        return [Run(0, hf_names[0], rank * g, g), Run(g, hf_names[1], rank * u, u)]


class VocabPad(Transform):
    """Embedding / output rows padded from the true vocabulary to a TP- and kernel-friendly size (zeros)."""

    def __init__(self, vocab_size: int, padded_vocab_size: int):
        super().__init__(tp_dim=0)
        if padded_vocab_size < vocab_size:
            raise ValueError(f"padded vocab {padded_vocab_size} < vocab {vocab_size}")
        self.vocab, self.padded = vocab_size, padded_vocab_size

    def to_megatron(self, hf: Sequence[Tensor]) -> Tensor:
        (t,) = hf
        if t.shape[0] != self.vocab:
            raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, the config says vocab_size={self.vocab}")
        if self.padded == self.vocab:
            return t  # no copy: this is the largest tensor of the model
        pad = t.new_zeros(self.padded - self.vocab, *t.shape[1:])
        return torch.cat([t, pad], dim=0)

    def to_hf(self, full: Tensor) -> list[Tensor]:
        return [full[: self.vocab]]

    def segments(self, hf_rows: Sequence[int]) -> list[Segment]:
        segs = [Segment(0, self.vocab, 0, 0)]
        if self.padded > self.vocab:
            segs.append(Segment(self.vocab, self.padded - self.vocab, None, 0))
        return segs

    def __repr__(self) -> str:
        return f"VocabPad({self.vocab} -> {self.padded})"


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Pad the vocabulary to a multiple of lcm(divisible_by, TP).

    Megatron-LM pads to `divisible_by * TP`, which makes the padded size (and so the checkpoint) depend on the TP
    it was written at. We pad to the lcm instead: with the default 128 that is the same size for every TP that
    divides 128 (1, 2, 4, 8, ...), so one checkpoint loads at any of them.
    """
    import math

    multiple = math.lcm(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


# The table entries made of transforms (a family's `weight_rules`; `mapping.table.WeightMap` expands them).
COLUMN, ROW, REPLICATED = 0, 1, None


@dataclass(frozen=True)
class Rule:
    megatron: str             # may contain {i}: the global layer index
    hf: tuple[str, ...]       # HF tensors combined by `transform`, same {i}
    transform: Transform
    layers: int = 0           # number of layers {i} ranges over (0: not per layer)


@dataclass(frozen=True)
class ParamMap:
    """One concrete megatron parameter and the HF tensors it is made of."""
    megatron: str
    hf: tuple[str, ...]
    transform: Transform

    def to_megatron(self, get_hf: Callable[[str], Tensor]) -> Tensor:
        return self.transform.to_megatron([get_hf(n) for n in self.hf])

    def to_hf(self, full: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.hf, self.transform.to_hf(full)))
