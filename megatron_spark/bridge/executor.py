"""Executing a bridge plan with torch.distributed point-to-point messages, bucket by bucket.

Every rank runs the same deterministic plan. For each bucket of target tensors, a rank posts its sends and
receives for every peer as ONE group (`batch_isend_irecv`; gloo on CPU, NCCL on GPU): row slices go straight from
the parameter into the target tensor, column slices through one staging buffer per peer. One group per bucket is
what NCCL needs: it runs a pair's ungrouped point-to-point ops in posting order on one stream, so two ranks that
each post a send to the other before the matching receive would both wait forever (gloo is truly asynchronous and
never shows it; tests/unit/test_bridge_replay.py replays the posted ops under NCCL's rules). It copies its own
slices locally and yields the
completed target tensors. Targets are either allocated per bucket and handed to the engine's loader (peak extra
memory: one bucket plus the column staging, two with double buffering) or, in place, the engine's own weight
tensors (`targets`: no allocation and no second copy; only the column staging is extra). The engine runs in the
trainer's own process (vLLM's external launcher), so local slices are plain copies and no CUDA-IPC handles are
needed.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Optional

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


@dataclass(frozen=True)
class Message:
    """One point-to-point message of a bucket, seen from the rank that posts it: a row slice travels alone, the
    column slices between two ranks travel packed in one buffer."""
    peer: int
    send: bool
    transfers: tuple[Transfer, ...]
    packed: bool

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.transfers)


def bucket_messages(by_dst: dict[str, list[Route]], bucket: list[str], me: int
                    ) -> tuple[list[Message], list[Transfer]]:
    """The messages rank `me` posts for one bucket (peers in rank order; to each peer its row sends, its packed
    column send, its row receives, its packed column receive) and the transfers it copies locally. Both ranks of
    a pair derive their messages from the same plan order, so the k-th send from a to b is the k-th receive on b
    from a: the pairing is implicit, as NCCL and gloo match point-to-point messages in order."""
    sends: dict[int, list[Transfer]] = defaultdict(list)
    recvs: dict[int, list[Transfer]] = defaultdict(list)
    local: list[Transfer] = []
    for name in bucket:
        for route in by_dst[name]:
            if route.dst == me:
                (local if route.src == me else recvs[route.src]).append(route.t)
            elif route.src == me:
                sends[route.dst].append(route.t)
    out: list[Message] = []
    for peer in sorted(set(sends) | set(recvs)):
        for send, ts in ((True, sends.get(peer, [])), (False, recvs.get(peer, []))):
            out += [Message(peer, send, (t,), False) for t in ts if t.dim == 0]
            cols = tuple(t for t in ts if t.dim != 0)
            if cols:
                out.append(Message(peer, send, cols, True))
    return out, local


class P2PExecutor:
    """Runs routed transfers between global ranks of the default (or given) process group."""

    def __init__(self, routes: list[Route], dst_shapes: dict[str, tuple[int, ...]], local_params: dict[str, Tensor],
                 dtype: torch.dtype, device: torch.device, bucket_bytes: int, group=None, zero_fill: bool = False,
                 double_buffer: bool = False, targets: Optional[dict[str, Tensor]] = None, job_group=None):
        """`job_group` (disaggregated engines, rollout/remote.JobGroup): post through that job-wide group instead, ranks
        being the job's. Its messages all go from training to rollout ranks, each side posting them in plan order,
        so NCCL's in-order matching cannot deadlock even ungrouped."""
        self.shapes, self.params = dst_shapes, local_params
        self.targets = targets  # written in place when given (the engine's weights), else allocated per bucket
        self.double_buffer = double_buffer
        self.zero_fill = zero_fill  # targets with padding rows that no transfer covers (vLLM vocab shards)
        self.dtype, self.device, self.group, self.job_group = dtype, device, group, job_group
        self.me = job_group.rank if job_group is not None else dist.get_rank()
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()
        self.buckets = make_buckets([r.t for r in routes], dst_shapes, self.elem_bytes, bucket_bytes)
        self.by_dst: dict[str, list[Route]] = defaultdict(list)
        for r in routes:
            self.by_dst[r.t.dst_name].append(r)
        self.stats = SyncStats()

    def _src_view(self, t: Transfer) -> Tensor:
        return self.params[t.param].detach().narrow(t.dim, t.src_offset, t.length)

    def stream(self) -> Iterator[tuple[str, Tensor]]:
        """Yields (target name, tensor) for the targets this rank receives; every rank must drain it in step.

        Row slices (dim 0) are contiguous on both sides and travel as their own messages, straight from the
        parameter into the target tensor; column slices (row-parallel weights, dim 1) are packed into one staging
        buffer per peer. Both sides post messages in plan order, so the pairing is implicit. With
        `double_buffer`, bucket k+1's messages are posted before bucket k is handed to the consumer, so the
        engine's loader works while the next bucket is on the wire (peak: two buckets instead of one).
        """
        self.stats = SyncStats()
        t_start = time.perf_counter()
        pending = self._post(self.buckets[0]) if self.buckets else None
        for i, bucket in enumerate(self.buckets):
            nxt = self._post(self.buckets[i + 1]) if self.double_buffer and i + 1 < len(self.buckets) else None
            mine = self._finish(pending)
            for name in bucket:
                if name in mine:
                    yield name, mine.pop(name)
            if not self.double_buffer and i + 1 < len(self.buckets):
                nxt = self._post(self.buckets[i + 1])
            pending = nxt
        self.stats.seconds = time.perf_counter() - t_start

    def _post(self, bucket: list[str]) -> dict:
        """Allocate this bucket's targets, post its sends and receives as one group, copy the local slices."""
        t0 = time.perf_counter()
        messages, local = bucket_messages(self.by_dst, bucket, self.me)
        mine: dict[str, Tensor] = {}
        for name in bucket:
            if any(r.dst == self.me for r in self.by_dst[name]):
                if self.targets is not None:
                    mine[name] = self.targets[name]
                else:
                    alloc = torch.zeros if self.zero_fill else torch.empty
                    mine[name] = alloc(self.shapes[name], dtype=self.dtype, device=self.device)
        ops, keep, staged_in = [], [], {}
        for m in messages:
            if m.send:
                if m.packed:
                    buf = torch.cat([self._src_view(t).to(self.dtype).reshape(-1) for t in m.transfers])
                else:
                    buf = self._src_view(m.transfers[0]).to(self.dtype).contiguous()
                keep.append(buf)  # alive until the group completes
                ops.append((True, buf, m.peer))
                self.stats.bytes_sent += m.numel * self.elem_bytes
            else:
                if m.packed:
                    buf = staged_in[m.peer] = torch.empty(m.numel, dtype=self.dtype, device=self.device)
                else:
                    buf = self._dst_view(mine[m.transfers[0].dst_name], m.transfers[0])
                ops.append((False, buf, m.peer))
                self.stats.bytes_received += m.numel * self.elem_bytes
        if self.job_group is not None:
            reqs = [(self.job_group.isend if send else self.job_group.irecv)(buf, peer) for send, buf, peer in ops]
        else:
            p2p = [dist.P2POp(dist.isend if send else dist.irecv, buf, peer, group=self.group)
                   for send, buf, peer in ops]
            reqs = dist.batch_isend_irecv(p2p) if p2p else []
        for t in local:
            view = self._dst_view(mine[t.dst_name], t)
            view.copy_(self._src_view(t).reshape(view.shape))
            self.stats.bytes_local += t.numel * self.elem_bytes
        packed_in = {m.peer: m.transfers for m in messages if not m.send and m.packed}
        return dict(t0=t0, mine=mine, reqs=reqs, keep=keep, staged_in=staged_in, packed_in=packed_in)

    def _finish(self, p: dict) -> dict[str, Tensor]:
        """Wait for a posted bucket, unpack its column slices; returns its completed targets."""
        for r in p["reqs"]:
            r.wait()
        mine = p["mine"]
        for peer, buf in p["staged_in"].items():
            off = 0
            for t in p["packed_in"][peer]:
                view = self._dst_view(mine[t.dst_name], t)
                view.copy_(buf[off:off + t.numel].view(view.shape))
                off += t.numel
        bucket_bytes = 0 if self.targets is not None else sum(v.numel() for v in mine.values()) * self.elem_bytes
        self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, bucket_bytes)
        self.stats.buckets += 1
        self.stats.per_bucket_s.append(time.perf_counter() - p["t0"])
        return mine

    @staticmethod
    def _dst_view(target: Tensor, t: Transfer) -> Tensor:
        if t.dim == 0 and target.dim() > 2:  # rows of e.g. a conv kernel: an engine may keep it flattened
            target = target.view(target.shape[0], -1)
        return target.narrow(t.dim, t.dst_offset, t.length)
