"""Qwen3-VL's index arithmetic against transformers' own (the numerical oracle): the learned position embedding
resampled to each image grid, and interleaved multimodal RoPE (with the chunked layout of Qwen2.5-VL as the negative
control: it must differ)."""
import pytest
import torch

from megatron_spark.models.vision_qwen3 import interleaved_mrope_angles, position_embedding_taps, position_embeddings

GRIDS = [[1, 6, 8], [1, 10, 4], [2, 4, 4], [1, 2, 2], [1, 12, 14], [1, 64, 40]]


@pytest.mark.parametrize("side", [6, 48])
def test_position_embeddings_match_transformers(side):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    g = torch.Generator().manual_seed(side)
    table = torch.randn(side * side, 16, generator=g)
    grid = torch.tensor(GRIDS)
    idx, w = get_vision_interpolation_indices_and_weights(grid, side, "bilinear", True, 2)
    ours_idx, ours_w = position_embedding_taps(grid, side, merge=2)
    assert torch.equal(ours_idx, idx) and torch.equal(ours_w, w)  # the same taps, bit for bit (fp32 arithmetic)
    want = (table[idx] * w[..., None]).sum(1)
    got = position_embeddings(table, grid, merge=2)
    assert got.shape == want.shape == (int(grid.prod(-1).sum()), 16) and torch.equal(got, want)
    # a 6 x 8 image on a 6 x 6 table is resampled (not a copy of any table row); raster order would differ
    raster = position_embeddings(table, grid, merge=1)
    assert not torch.allclose(raster, want, atol=1e-3)


def _hf_rotary(section, head_dim=32, theta=5e6):
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                            rope_parameters={"rope_type": "default", "rope_theta": theta,
                                             "mrope_section": list(section), "mrope_interleaved": True})
    return Qwen3VLTextRotaryEmbedding(cfg)


@pytest.mark.parametrize("section", [(6, 5, 5), (8, 4, 4)])
def test_interleaved_mrope_matches_transformers(section):
    rope = _hf_rotary(section)
    pos = torch.randint(0, 300, (3, 2, 11), generator=torch.Generator().manual_seed(1))
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    ang = interleaved_mrope_angles(pos, rope.inv_freq, section)
    torch.testing.assert_close(ang.cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(ang.sin(), sin, rtol=0, atol=1e-6)
    # Qwen2.5-VL's chunked layout (T block, H block, W block) rotates other channels by other axes
    freqs = pos[..., None].float() * rope.inv_freq
    chunked = torch.cat([f[i] for i, f in enumerate(freqs.split(list(section), dim=-1))], dim=-1)
    assert not torch.allclose(torch.cat([chunked, chunked], -1).cos(), cos, atol=1e-3)
    # text: all three rows equal, so the layout does not matter and the angles are plain RoPE's
    text = pos[:1].expand(3, -1, -1)
    plain = text[0][..., None].float() * rope.inv_freq
    torch.testing.assert_close(interleaved_mrope_angles(text, rope.inv_freq, section),
                               torch.cat([plain, plain], -1))
