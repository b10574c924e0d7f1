"""Weight sync from the Megatron trainer into colocated vLLM engines: plan once, stream buckets every update.

Layout: the world is split into engines of `rollout_tp` consecutive ranks; engine e pulls from Megatron
data-parallel replica e % DP. The plan is computed once from the shapes; each `sync()` streams the buckets and
hands the tensors to the engine as they complete, so the engine's own loader consumes them one bucket at a time.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_spark.bridge.executor import P2PExecutor, Route, SyncStats
from megatron_spark.bridge.planner import plan
from megatron_spark.mapping.qwen import WeightMap, expected_hf_shapes
from megatron_spark.models.weights import megatron_named_params


class WeightSync:
    def __init__(self, chunks: list[torch.nn.Module], wmap: WeightMap, layout, rollout_tp: int,
                 target: str = "hf_full", bucket_mb: int = 512, double_buffer: bool = False):
        world = dist.get_world_size()
        if world % rollout_tp:
            raise ValueError(f"rollout TP {rollout_tp} does not divide the world size {world}")
        self.local = {n: p for c in chunks for n, p in megatron_named_params(c)}
        me = dist.get_rank()
        coords = layout.coords(me)
        owners: list = [None] * world
        dist.all_gather_object(owners, (coords, sorted(self.local)))
        stage = {n: c["pp"] for c, names in owners if c["dp"] == 0 and c["tp"] == 0 for n in names}
        missing = [p.megatron for p in wmap.export_params() if p.megatron not in stage]
        if missing:
            raise ValueError(f"no pipeline stage owns {missing[:3]}...: the model and the weight map disagree")
        shapes = expected_hf_shapes(wmap.shape)
        transfers = plan(wmap, shapes, layout.tp, layout.pp, stage.__getitem__, rollout_tp, target)
        routes = []
        for engine in range(world // rollout_tp):
            replica = engine % layout.dp
            for t in transfers:
                routes.append(Route(t, layout.rank_of(tp=t.src_tp, pp=t.src_pp, dp=replica),
                                    engine * rollout_tp + t.dst_tp))
        if target != "hf_full":
            raise NotImplementedError("in-place vLLM shard writes (target 'vllm_tp') need the GPU executors")
        param = next(iter(self.local.values()))
        self.executor = P2PExecutor(routes, shapes, self.local, param.dtype, param.device, bucket_mb << 20,
                                    double_buffer=double_buffer)
        self.num_transfers = len(transfers)

    def stream(self):
        """(HF name, tensor) for this rank's engine; all ranks must consume it together."""
        return self.executor.stream()

    @property
    def stats(self) -> SyncStats:
        return self.executor.stats
