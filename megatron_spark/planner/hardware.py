"""Accelerators as data: usable memory, dense bf16 peak, HBM bandwidth, NVLink and network bandwidth per GPU."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float        # what torch can allocate (a little under the marketing size)
    bf16_tflops: float       # dense
    hbm_tb_s: float
    nvlink_gb_s: float       # per direction, per GPU
    network_gb_s: float      # per GPU across nodes (e.g. 400 Gb/s InfiniBand = 50 GB/s)


GPUS = {
    "h100-80gb": Gpu("H100 SXM 80GB", 79.2, 989.0, 3.35, 450.0, 50.0),
    "h200-141gb": Gpu("H200 141GB", 139.8, 989.0, 4.8, 450.0, 50.0),
    "a100-80gb": Gpu("A100 SXM 80GB", 79.2, 312.0, 2.04, 300.0, 25.0),
    "b200-180gb": Gpu("B200 180GB", 178.0, 2250.0, 8.0, 900.0, 50.0),
}


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ValueError(f"--gpu '{name}' is unknown; choose one of {', '.join(GPUS)}")
    return GPUS[name]
