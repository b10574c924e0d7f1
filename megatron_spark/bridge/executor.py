"""Executing a bridge plan with torch.distributed point-to-point messages, bucket by bucket.

Every rank runs the same deterministic plan. For each bucket of target tensors, a rank packs the slices it owns
for each peer into one flat buffer, posts one send and one receive per peer (gloo on CPU, NCCL on GPU), copies
its own slices locally, and yields the completed target tensors. Peak extra memory is one bucket of received
tensors plus the send buffers for that bucket; nothing else is gathered.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_spark.bridge.planner import Transfer


@dataclass
class SyncStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    buckets: int = 0
    peak_bucket_bytes: int = 0
    seconds: float = 0.0
    per_bucket_s: list = field(default_factory=list)


def make_buckets(transfers: list[Transfer], dst_shapes: dict[str, tuple[int, ...]], elem_bytes: int,
                 bucket_bytes: int) -> list[list[str]]:
    """Target tensors in plan order, grouped so each bucket holds at most `bucket_bytes` (at least one tensor)."""
    order: dict[str, None] = {}
    for t in transfers:
        order.setdefault(t.dst_name, None)
    buckets, cur, size = [], [], 0
    for name in order:
        nbytes = elem_bytes
        for s in dst_shapes[name]:
            nbytes *= s
        if cur and size + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


@dataclass(frozen=True)
class Route:
    """One planned transfer bound to global ranks (engines pull from different data-parallel replicas)."""
    t: Transfer
    src: int
    dst: int


class P2PExecutor:
    """Runs routed transfers between global ranks of the default (or given) process group."""

    def __init__(self, routes: list[Route], dst_shapes: dict[str, tuple[int, ...]], local_params: dict[str, Tensor],
                 dtype: torch.dtype, device: torch.device, bucket_bytes: int, group=None):
        self.shapes, self.params = dst_shapes, local_params
        self.dtype, self.device, self.group = dtype, device, group
        self.me = dist.get_rank()
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()
        self.buckets = make_buckets([r.t for r in routes], dst_shapes, self.elem_bytes, bucket_bytes)
        self.by_dst: dict[str, list[Route]] = defaultdict(list)
        for r in routes:
            self.by_dst[r.t.dst_name].append(r)
        self.stats = SyncStats()

    def _src_view(self, t: Transfer) -> Tensor:
        return self.params[t.param].detach().narrow(t.dim, t.src_offset, t.length)

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        """Yields (target name, tensor) for the targets this rank receives; every rank must drain it in step."""
        self.stats = SyncStats()
        t_start = time.perf_counter()
        for bucket in self.buckets:
            t0 = time.perf_counter()
            outgoing: dict[int, list[Tensor]] = defaultdict(list)
            incoming: dict[int, list[tuple[Transfer, str]]] = defaultdict(list)
            mine: dict[str, Tensor] = {}
            local: list[Transfer] = []
            for name in bucket:
                for route in self.by_dst[name]:
                    t, src, dst = route.t, route.src, route.dst
                    if dst == self.me:
                        if name not in mine:  # zeros: padding rows of a target shard are never sent
                            mine[name] = torch.zeros(self.shapes[name], dtype=self.dtype, device=self.device)
                        if src == self.me:
                            local.append(t)
                        else:
                            incoming[src].append((t, name))
                    elif src == self.me:
                        outgoing[dst].append(self._src_view(t).reshape(-1))
            reqs, recv_bufs = [], {}
            for peer in sorted(set(outgoing) | set(incoming)):
                if peer in outgoing:
                    buf = torch.cat(outgoing[peer]).to(self.dtype).contiguous()
                    self.stats.bytes_sent += buf.numel() * self.elem_bytes
                    reqs.append(dist.isend(buf, peer, group=self.group))
                    outgoing[peer] = [buf]  # keep alive until the send completes
                if peer in incoming:
                    n = sum(t.numel for t, _ in incoming[peer])
                    recv_bufs[peer] = torch.empty(n, dtype=self.dtype, device=self.device)
                    reqs.append(dist.irecv(recv_bufs[peer], peer, group=self.group))
            for t in local:
                self._dst_view(mine[t.dst_name], t).copy_(self._src_view(t))
                self.stats.bytes_local += t.numel * self.elem_bytes
            for r in reqs:
                r.wait()
            for peer, items in incoming.items():
                off = 0
                buf = recv_bufs[peer]
                for t, name in items:
                    view = self._dst_view(mine[name], t)
                    view.copy_(buf[off:off + t.numel].view(view.shape))
                    off += t.numel
                self.stats.bytes_received += off * self.elem_bytes
            bucket_bytes = sum(v.numel() for v in mine.values()) * self.elem_bytes
            self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, bucket_bytes)
            self.stats.buckets += 1
            self.stats.per_bucket_s.append(time.perf_counter() - t0)
            for name in bucket:
                if name in mine:
                    yield name, mine.pop(name)
        self.stats.seconds = time.perf_counter() - t_start

    @staticmethod
    def _dst_view(target: Tensor, t: Transfer) -> Tensor:
        return target.narrow(t.dim, t.dst_offset, t.length)
