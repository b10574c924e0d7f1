"""The Qwen3 family's config reading and weight table, against a transformers Qwen3 checkpoint (no megatron-core:
the logits, converters and vLLM sync are checked in tests/dist, the training loop in tests/e2e/test_qwen3.py)."""
import json

import pytest

from megatron_spark.mapping.qwen import WeightMap, expected_hf_shapes
from megatron_spark.mapping.transforms import QKVInterleave
from megatron_spark.models.hf_config import load_hf_config, parse_hf_config


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from megatron_spark.fixtures.tiny import build_qwen3

    return build_qwen3(tmp_path_factory.mktemp("q3") / "m", tied=False, layers=2, head_dim=64)


def test_the_config_reads_as_qwen3(qwen3):
    s = load_hf_config(qwen3)
    assert s.family == "qwen3" and s.text.qk_norm and not s.text.qkv_bias
    assert s.text.head_dim == 64 != s.text.hidden_size // s.text.num_heads  # read, not derived


def test_the_table_names_every_tensor_of_a_transformers_checkpoint_once(qwen3):
    from safetensors.torch import load_file

    shape = load_hf_config(qwen3)
    tensors = load_file(str(qwen3 / "model.safetensors"))
    expected = expected_hf_shapes(shape)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    wmap = WeightMap(shape)
    assert sorted(wmap.hf_names()) == sorted(tensors)
    qkv = wmap["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert isinstance(qkv.transform, QKVInterleave) and qkv.transform.d == 64
    norm = wmap["decoder.layers.1.self_attention.q_layernorm.weight"]
    assert norm.hf == ("model.layers.1.self_attn.q_norm.weight",) and norm.transform.tp_dim is None  # replicated
    assert "decoder.layers.1.self_attention.linear_qkv.bias" not in wmap


def test_qwen2_keeps_its_biases_and_has_no_qk_norms():
    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257}
    names = WeightMap(parse_hf_config(cfg)).hf_names()
    assert "model.layers.0.self_attn.q_proj.bias" in names and not any("q_norm" in n for n in names)
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):  # (no family builds it)
        parse_hf_config({**cfg, "use_sliding_window": True})


@pytest.mark.parametrize("field,fix", [("attention_bias", "none"), ("use_sliding_window", "set it to false")])
def test_variants_the_model_does_not_build_are_refused_by_name(qwen3, field, fix):
    cfg = {**json.loads((qwen3 / "config.json").read_text()), field: True}
    with pytest.raises(ValueError, match=f"{field}=true.*{fix}"):
        parse_hf_config(cfg)
