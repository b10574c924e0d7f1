"""The parallel layout: TP, PP, VPP, CP, DP over a world, validated once, then megatron-core initialised from it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from megatron_spark import compat, cpu_shim
from megatron_spark.layout_rules import ModelFacts, model_layout_problems, stage_layers  # noqa: F401 (re-exported)


def attempt_store(timeout_s: int) -> dict:
    """init_process_group arguments for a restarted attempt under torchrun (`--max-restarts`). torchrun's static
    rendezvous (`--master-addr/--master-port`, what `megatron-spark train` and slurm/train.sbatch use) keeps one
    TCPStore for every attempt, so the previous attempt's keys -- the dead ranks' gloo addresses among them -- are
    still there and the new ranks' first connections are refused. A prefix per attempt keeps the attempts apart.
    Empty (the usual env:// init) for a first attempt and outside torchrun."""
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"/megatron_spark/attempt_{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": world}


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    world_size: int = 1
    sequence_parallel: bool = False
    first_stage_layers: Optional[int] = None  # None: chosen by `stage_layers` (even when PP divides the layers)
    last_stage_layers: Optional[int] = None

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel layout: {name}={getattr(self, name)} must be >= 1")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(f"parallel layout: world size {self.world_size} is not a multiple of TP*PP*CP="
                             f"{self.tp * self.pp * self.cp}; launch a multiple of that many ranks")
        if self.vpp is not None and self.pp == 1:
            raise ValueError("parallel layout: virtual pipeline stages (vpp) need pp > 1")

    def stage_layers(self, num_layers: int) -> list[int]:
        """Transformer layers per pipeline stage of this layout (see `stage_layers`)."""
        return stage_layers(num_layers, self.pp, self.first_stage_layers, self.last_stage_layers)

    def layer_stage(self, layer: int, num_layers: int) -> int:
        """The pipeline stage holding transformer layer `layer` (0-based, global). With virtual stages the layers
        are cut into PP x VPP equal chunks dealt round-robin: chunk c = v * PP + p sits on stage p (megatron-core)."""
        if self.vpp:
            return (layer // (num_layers // (self.pp * self.vpp))) % self.pp
        end = 0
        for stage, n in enumerate(self.stage_layers(num_layers)):
            end += n
            if layer < end:
                return stage
        raise ValueError(f"layer {layer} is beyond the model's {num_layers} layers")

    def param_stage(self, name: str, num_layers: int) -> int:
        """The pipeline stage holding a Megatron parameter (global local-spec name, as `megatron_named_params`
        yields it): the vision tower and the embedding on the first stage, the final norm and the output layer on
        the last, each transformer layer where `layer_stage` puts it."""
        if "vision_model" in name or "embedding" in name:
            return 0
        m = re.search(r"decoder\.layers\.(\d+)\.", name)
        return self.layer_stage(int(m.group(1)), num_layers) if m else self.pp - 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @classmethod
    def from_config(cls, par, world_size: Optional[int] = None) -> "ParallelLayout":
        ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        return cls(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                   vpp=par.virtual_pipeline_model_parallel_size, cp=par.context_parallel_size, world_size=ws,
                   sequence_parallel=par.sequence_parallel,
                   first_stage_layers=par.num_layers_in_first_pipeline_stage,
                   last_stage_layers=par.num_layers_in_last_pipeline_stage)

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
            dist.init_process_group(process_group_backend(on_gpu), timeout=timedelta(seconds=timeout_s),
                                    **attempt_store(timeout_s))
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"parallel layout expects {self.world_size} ranks but the job has "
                             f"{dist.get_world_size()}; fix WORLD_SIZE / the launcher")
        if not ps.model_parallel_is_initialized():
            compat.initialize_model_parallel(
                tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                virtual_pipeline_model_parallel_size=self.vpp, context_parallel_size=self.cp)
        model_parallel_cuda_manual_seed(seed)


def process_group_backend(cuda: bool) -> str:
    """The default process group's backend: on a GPU, NCCL for CUDA tensors AND gloo for CPU tensors.

    A pure "nccl" group maps only the CUDA device type, so a collective on a CPU tensor (a metric, a stop flag, an
    object collective's sizes) fails with "No backend type associated with device type cpu", even at world size 1.
    megatron-core creates its TP/PP/DP groups with backend=None, which inherits this device map, so every group of
    the run accepts both kinds of tensor; object collectives and barriers then go through gloo (CPU memory)."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def check_model_layout(shape, tp: int, pp: int, rollout_tp: Optional[int] = None,
                       flags: tuple[str, str, str] = ("--tp", "--pp", "--rollout-tp")) -> None:
    """The model's layout rules (layout_rules.model_layout_problems, the one place they are written) for an entry
    point that names the knobs by its `flags`: raises ValueError naming the flag and the fix."""

    f_tp, f_pp, f_rtp = flags
    if tp < 1 or pp < 1 or (rollout_tp is not None and rollout_tp < 1):
        raise ValueError(f"{f_tp}, {f_pp}{', ' + f_rtp if rollout_tp is not None else ''} must be >= 1")
    problems = model_layout_problems(ModelFacts.of(shape), tp, pp, rollout_tp,
                                     {"tp": f_tp, "pp": f_pp, "rollout_tp": f_rtp})
    if problems:
        raise ValueError(problems[0][1])
