"""The one dtype table. A config or CLI names a dtype 'bf16', 'fp16' or 'fp32'; everything else is derived here:
the torch dtype, the name Hugging Face configs and vLLM use, and the bytes per element (the planner, which must
not import torch to stay fast, uses only the names and sizes)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAMES = ("bf16", "fp16", "fp32")
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
HF_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config.json's torch_dtype; vLLM's dtype


def _check(name: str) -> str:
    if name not in BYTES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(NAMES)}")
    return name


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[_check(name)]


def name_of(dtype: "torch.dtype") -> str:
    """'bf16' / 'fp16' / 'fp32' for a torch dtype; ValueError for any other."""
    for n in NAMES:
        if torch_dtype(n) == dtype:
            return n
    raise ValueError(f"dtype {dtype}: only {', '.join(NAMES)} are supported")


def hf_name(name: str) -> str:
    return HF_NAMES[_check(name)]
