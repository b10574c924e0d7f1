"""The parallel layout: TP, PP, VPP, CP, DP over a world, validated once, then megatron-core initialised from it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from megatron_spark import compat, cpu_shim


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    world_size: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel layout: {name}={getattr(self, name)} must be >= 1")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(f"parallel layout: world size {self.world_size} is not a multiple of TP*PP*CP="
                             f"{self.tp * self.pp * self.cp}; launch a multiple of that many ranks")
        if self.vpp is not None and self.pp == 1:
            raise ValueError("parallel layout: virtual pipeline stages (vpp) need pp > 1")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @classmethod
    def from_config(cls, par, world_size: Optional[int] = None) -> "ParallelLayout":
        ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        return cls(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                   vpp=par.virtual_pipeline_model_parallel_size, cp=par.context_parallel_size, world_size=ws,
                   sequence_parallel=par.sequence_parallel)

    def coords(self, rank: int) -> dict[str, int]:
        """megatron-core's default rank order 'tp-cp-ep-dp-pp': TP fastest, PP slowest."""
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}

    def rank_of(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def initialize(self, seed: int = 1234, timeout_s: int = 1800) -> None:
        """init_process_group (NCCL on GPU, gloo on CPU) and megatron-core's parallel state, then seed the RNGs."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            cpu_shim.install()
        if not dist.is_initialized():
            if on_gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"parallel layout expects {self.world_size} ranks but the job has "
                             f"{dist.get_world_size()}; fix WORLD_SIZE / the launcher")
        if not ps.model_parallel_is_initialized():
            compat.initialize_model_parallel(
                tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                virtual_pipeline_model_parallel_size=self.vpp, context_parallel_size=self.cp)
        model_parallel_cuda_manual_seed(seed)
