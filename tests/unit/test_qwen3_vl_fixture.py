"""The tiny Qwen3-VL fixture (`fixtures/tiny.build_qwen3_vl`): the first step of the Qwen3-VL family. What later
parity tests rely on: transformers loads it as `qwen3_vl`, its learned position grid is not an image's grid (so the
interpolation runs), the tie flag is in text_config (vLLM reads it there), and DeepStack changes the logits of an
image prompt (so a Megatron model that skipped it could not match HF)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def q3vl(tmp_path_factory):
    from megatron_spark.fixtures.tiny import build_qwen3_vl

    return build_qwen3_vl(tmp_path_factory.mktemp("q3vl") / "model", tied=True)


def image_inputs(hf_dir):
    from transformers import AutoProcessor

    from megatron_spark.fixtures.tiny import tiny_image

    proc = AutoProcessor.from_pretrained(hf_dir)
    msgs = [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "What is 3 + 4?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[tiny_image(0, size=(112, 84))], return_tensors="pt")


def test_config_is_qwen3_vl_with_its_features(q3vl):
    cfg = json.loads((q3vl / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert cfg["vision_config"]["deepstack_visual_indexes"] == [0, 2] and cfg["vision_config"]["patch_size"] == 16
    assert cfg["text_config"]["tie_word_embeddings"] is True
    rope = cfg["text_config"].get("rope_parameters") or cfg["text_config"].get("rope_scaling")
    assert rope["mrope_interleaved"] is True and sum(rope["mrope_section"]) == cfg["text_config"]["head_dim"] // 2


def test_deepstack_and_the_position_grid_reach_the_logits(q3vl):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(q3vl, dtype=torch.float32).eval()
    inputs = image_inputs(q3vl)
    grid = inputs["image_grid_thw"][0].tolist()
    assert grid[1] * grid[2] != model.config.vision_config.num_position_embeddings  # (interpolated, not copied)
    with torch.no_grad():
        base = model(**inputs).logits
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
        without = model(**inputs).logits
    image = inputs["input_ids"][0] == model.config.image_token_id
    after = image.nonzero().max().item() + 1
    # DeepStack adds into the first LM layers at the image positions: the logits there and after them move
    assert (base[0, image] - without[0, image]).abs().max() > 1e-3
    assert (base[0, after:] - without[0, after:]).abs().max() > 1e-3
