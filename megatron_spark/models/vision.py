"""Index arithmetic of Qwen2.5-VL: window order, 2-D rotary angles, attention masks, multimodal RoPE positions.

Pure tensor functions (no parameters), written from the model definition: patches arrive from the processor in
merge-block-major order; window attention groups `window_size / patch_size / merge` merged units per side.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_spark.models.hf_config import VisionShape


def block_major(h: int, w: int, m: int) -> tuple[Tensor, Tensor]:
    """Row and column index of every patch, in the processor's order (m x m merge blocks, row-major)."""
    hpos = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
    wpos = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
    return hpos, wpos


def vision_rotary_freqs(grid_thw: Tensor, v: VisionShape) -> Tensor:
    """Rotary angles [patches, head_dim]: the first half rotates by row, the second by column, then repeated."""
    head_dim = v.hidden_size // v.num_heads
    half = head_dim // 2
    inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = block_major(h, w, v.spatial_merge_size)
        ang = torch.cat([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], dim=-1)
        out.append(ang.repeat(t, 1))
    ang = torch.cat(out).to(grid_thw.device)
    return torch.cat([ang, ang], dim=-1)


def vision_window_index(grid_thw: Tensor, v: VisionShape) -> tuple[Tensor, Tensor]:
    """(order of merge units so that windows are contiguous, cumulative window lengths in patches)."""
    m = v.spatial_merge_size
    ws = v.window_size // m // v.patch_size
    unit = m * m
    order, cu, base = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, ws):
                for c0 in range(0, gw, ws):
                    win = idx[ti, r0:r0 + ws, c0:c0 + ws].reshape(-1)
                    order.append(win + base)
                    cu.append(cu[-1] + win.numel() * unit)
        base += t * gh * gw
    return torch.cat(order).to(grid_thw.device), torch.tensor(cu, device=grid_thw.device)


def frame_bounds(grid_thw: Tensor) -> list[int]:
    """Cumulative patch counts of every image frame: the blocks of the full-attention layers."""
    frames = [0]
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            frames.append(frames[-1] + h * w)
    return frames


def vision_packed_seq_params(grid_thw: Tensor, cu_windows: Tensor, device):
    """(full, window) megatron-core PackedSeqParams in THD form: each frame, or each window, a separate sequence
    of the packed [patches, 1, hidden] input, so TE's flash / cuDNN kernels run variable-length attention instead
    of the unfused path an arbitrary [n, n] mask forces (memory quadratic in patches: ~68 GB per layer at 65k
    patches). The same blocks as `vision_attention_masks`."""
    from megatron.core.packed_seq_params import PackedSeqParams

    out = []
    for bounds in (frame_bounds(grid_thw), cu_windows.tolist()):
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        longest = int((cu[1:] - cu[:-1]).max())
        out.append(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                   max_seqlen_kv=longest))
    return tuple(out)


def _block_diag_mask(bounds: list[int], n: int, device) -> Tensor:
    seg = torch.zeros(n, dtype=torch.long, device=device)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[a:b] = i
    return (seg[:, None] != seg[None, :]).view(1, 1, n, n)  # True = masked


def vision_attention_masks(grid_thw: Tensor, cu_windows: Tensor, n: int, device) -> tuple[Tensor, Tensor]:
    """Boolean masks (True = blocked) for the full-attention blocks (per image frame) and the window blocks (the
    local spec's attention; TE takes `vision_packed_seq_params` instead)."""
    return (_block_diag_mask(frame_bounds(grid_thw), n, device),
            _block_diag_mask(cu_windows.tolist(), n, device))


def mrope_position_ids(input_ids: Tensor, image_grid_thw: Tensor | None, image_token_id: int,
                       spatial_merge_size: int) -> Tensor:
    return mrope_positions_and_image_mask(input_ids, image_grid_thw, image_token_id, spatial_merge_size)[0]


def mrope_positions_and_image_mask(input_ids: Tensor, image_grid_thw, image_token_id: int,
                                   spatial_merge_size: int) -> tuple[Tensor, Tensor]:
    """Multimodal RoPE positions [3, b, s] and the [b, s] mask of positions that take image embeddings.

    Text advances all three streams; an image spans (t, h, w) positions. `image_grid_thw` is one [images, 3]
    tensor consumed in batch order, or a per-sequence list of such tensors (None for a text-only sequence).

    After an image the text continues from start + max(h, w) / merge, as Qwen2.5-VL does. Placeholder tokens
    beyond the images of `image_grid_thw` (a completion can sample the placeholder id) count as text, as they do
    in HF where only the processor marks image positions.
    """
    b, s = input_ids.shape
    pos = torch.zeros(3, b, s, dtype=torch.long, device=input_ids.device)
    image_mask = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
    per_sequence = isinstance(image_grid_thw, (list, tuple))
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None and not per_sequence else iter(())
    for bi in range(b):
        if per_sequence:  # each sequence's own images: a sampled placeholder can never take another's image
            own = image_grid_thw[bi]
            grids = iter(own.tolist() if own is not None else ())
        ids = input_ids[bi].tolist()
        cur, i = 0, 0
        while i < s:
            grid = next(grids, None) if ids[i] == image_token_id else None
            if grid is None:
                pos[:, bi, i] = cur
                cur += 1
                i += 1
                continue
            t, h, w = grid
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            n = t * gh * gw
            tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).reshape(-1)
            hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).reshape(-1)
            ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).reshape(-1)
            if i + n > s or any(x != image_token_id for x in ids[i:i + n]):
                raise ValueError(f"sequence {bi}: an image of grid {(t, h, w)} needs {n} consecutive image tokens "
                                 f"at position {i}")
            pos[:, bi, i:i + n] = torch.stack([tt, hh, ww]).to(pos.device) + cur
            image_mask[bi, i:i + n] = True
            cur += max(gh, gw)
            i += n
    return pos, image_mask
