"""Index arithmetic of Qwen3-VL that Qwen2.5-VL does not have: the learned position embedding resampled to each
image's patch grid, and interleaved multimodal RoPE.

Pure tensor functions, written from the model definition (transformers' helpers are the oracle in
tests/unit/test_vision_qwen3.py). The Qwen3-VL model on megatron-core (issue: Qwen3 / Qwen3-VL) is built on them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_spark.models.vision import block_major


def _axis_taps(index: Tensor, size: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis with align_corners: patch `index` of `size` reads table coordinate
    index * (side - 1) / (size - 1) (0 for a one-patch axis), in fp32 and in that order of operations, as the
    reference computes it: (lower tap, upper tap, weight of the lower, weight of the upper)."""
    coord = index.to(torch.float32) * (side - 1) / (size - 1).clamp(min=1)
    lo = coord.floor()
    w_hi = (1 - (coord - lo - 1).abs()).clamp(min=0)
    return lo.long().clamp(0, side - 1), (lo.long() + 1).clamp(0, side - 1), 1 - (coord - lo), w_hi


def position_embedding_taps(grid_thw: Tensor, side: int, merge: int) -> tuple[Tensor, Tensor]:
    """Qwen3-VL's learned `side x side` position table resampled to every patch (bilinear, align_corners), in the
    processor's patch order (merge blocks; each frame of a video reads the same positions).

    Returns (indices, weights), each [patches, 4]: a patch's embedding is sum_k weights[:, k] * table[indices[:, k]]
    over the flattened table (`position_embeddings`)."""
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        rows, cols = block_major(h, w, merge)
        r0, r1, wr0, wr1 = _axis_taps(rows, torch.tensor(h), side)
        c0, c1, wc0, wc1 = _axis_taps(cols, torch.tensor(w), side)
        i = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=-1)
        k = torch.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], dim=-1)
        idx.append(i.repeat(t, 1))
        wts.append(k.repeat(t, 1))
    return torch.cat(idx).to(grid_thw.device), torch.cat(wts).to(grid_thw.device)


def position_embeddings(table: Tensor, grid_thw: Tensor, merge: int) -> Tensor:
    """[patches, hidden]: the learned table [side * side, hidden] at every patch of `grid_thw` (added to the patch
    embeddings before the first vision block)."""
    side = int(round(table.shape[0] ** 0.5))
    indices, weights = position_embedding_taps(grid_thw, side, merge)
    return (table[indices] * weights.to(table.dtype)[..., None]).sum(dim=1)


def interleaved_mrope_angles(position_ids: Tensor, inv_freq: Tensor, section: tuple[int, int, int]) -> Tensor:
    """Rotary angles [b, s, 2 * len(inv_freq)] of interleaved multimodal RoPE: frequency channel j rotates by the
    height position when j % 3 == 1 and j < 3 * section[1], by the width position when j % 3 == 2 and
    j < 3 * section[2], and by the temporal position otherwise (T H W T H W ... T T); the half is repeated (the
    rotate-half convention). Qwen2.5-VL's MRoPE instead gives each axis one contiguous block of channels.

    `position_ids` [3, b, s] (temporal, height, width rows, as `vision.mrope_position_ids` gives them)."""
    channel = torch.arange(inv_freq.numel(), device=inv_freq.device)
    axis = torch.zeros_like(channel)
    axis[(channel % 3 == 1) & (channel < 3 * section[1])] = 1
    axis[(channel % 3 == 2) & (channel < 3 * section[2])] = 2
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.to(torch.float32)  # [3, b, s, d/2]
    picked = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)
    return torch.cat([picked, picked], dim=-1)
