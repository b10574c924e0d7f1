"""Our Qwen2.5-VL index arithmetic against transformers' own helpers (the numerical oracle)."""
import torch

from megatron_spark.models.hf_config import load_hf_config
from megatron_spark.models.vision import mrope_position_ids, vision_rotary_freqs, vision_window_index


def test_window_index_and_rope_positions_match_hf(tiny_models):
    from transformers.vision_utils import get_vision_window_index

    shape = load_hf_config(tiny_models["vl_untied"])
    v = shape.vision
    grid = torch.tensor([[1, 6, 8], [1, 10, 4], [1, 4, 4]])
    ours_idx, ours_cu = vision_window_index(grid, v)
    hf_idx, hf_cu = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
    assert torch.equal(ours_idx, hf_idx)
    assert ours_cu.tolist() == hf_cu.tolist()
    assert vision_rotary_freqs(grid, v).shape == (int(grid.prod(-1).sum()), v.hidden_size // v.num_heads)


def test_mrope_positions_match_hf_get_rope_index(tiny_models):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_spark.fixtures.tiny import tiny_image

    path = tiny_models["vl_untied"]
    shape = load_hf_config(path)
    proc = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count"}, {"type": "image"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(text=[text], images=[tiny_image(0, (112, 84)), tiny_image(1, (56, 140))], return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    hf_pos, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                           image_grid_thw=enc["image_grid_thw"])
    ours = mrope_position_ids(enc["input_ids"], enc["image_grid_thw"], shape.image_token_id,
                              shape.vision.spatial_merge_size)
    assert torch.equal(ours, hf_pos)


def test_sampled_placeholder_tokens_after_the_images_are_text():
    from megatron_spark.models.vision import mrope_positions_and_image_mask

    ids = torch.tensor([[5, 7, 7, 7, 7, 6, 7, 8]])  # 7 = placeholder; one 1x4x4 image (4 merged tokens), then a
    pos, mask = mrope_positions_and_image_mask(ids, torch.tensor([[1, 4, 4]]), 7, 2)  # sampled placeholder
    assert mask[0].tolist() == [False, True, True, True, True, False, False, False]
    assert pos[:, 0, 6].tolist() == [4, 4, 4] and pos[:, 0, 7].tolist() == [5, 5, 5]


def test_packed_sequences_are_the_blocks_of_the_dense_masks(tiny_models):
    """TE's vision attention runs on THD sequences (cu_seqlens) instead of [n, n] masks: for several images (two
    frames in one), each packed sequence must be exactly one unmasked diagonal block of the local spec's mask,
    windows and frames both (HF's cu_window_seqlens / cu_seqlens)."""
    from megatron_spark.models.vision import vision_attention_masks, vision_packed_seq_params

    v = load_hf_config(tiny_models["vl_untied"]).vision
    grid = torch.tensor([[1, 8, 12], [2, 4, 4], [1, 12, 8]])
    _, cu_windows = vision_window_index(grid, v)
    n = int(sum(t * h * w for t, h, w in grid.tolist()))
    dense = vision_attention_masks(grid, cu_windows, n, "cpu")
    packed = vision_packed_seq_params(grid, cu_windows, "cpu")
    for mask, p in zip(dense, packed):
        cu = p.cu_seqlens_q.tolist()
        assert p.qkv_format == "thd" and cu == p.cu_seqlens_kv.tolist() and cu[0] == 0 and cu[-1] == n
        assert p.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        seg = torch.zeros(n, dtype=torch.long)
        for i, (a, b) in enumerate(zip(cu, cu[1:])):
            seg[a:b] = i
        assert torch.equal(mask.view(n, n), seg[:, None] != seg[None, :])
    assert len(packed[0].cu_seqlens_q) == 1 + 4  # four frames; more windows than frames
    assert len(packed[1].cu_seqlens_q) > 5
