"""The Qwen3 family's config reading and weight table, against a transformers Qwen3 checkpoint (no megatron-core:
the logits, converters and vLLM sync are checked in tests/dist, the training loop in tests/e2e/test_qwen3.py)."""
import json

import pytest

from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
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


def test_the_thinking_switch_reaches_training_prompts_and_evaluation_alike(qwen3, tmp_path):
    """data.chat_template_kwargs goes to the chat template of every training prompt (Qwen3's enable_thinking=false
    opens the answer with an empty think block), into the prompt protocol saved with checkpoints, and from it into
    `megatron-spark eval`'s prompts: token for token the training prompt. Unset, nothing changes (and earlier
    evaluation results keep their settings hash)."""
    import argparse
    import dataclasses

    from megatron_spark.config import load_config
    from megatron_spark.data import PromptBuilder
    from megatron_spark.evaluation.cli import add_eval_args, settings_from
    from megatron_spark.evaluation.protocol import TrainedPrompts
    from megatron_spark.evaluation.settings import EvalSettings
    from megatron_spark.train import prompt_protocol

    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    cfg = load_config(None, ["data.chat_template_kwargs.enable_thinking=false"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    off = PromptBuilder.from_config(cfg.data, str(qwen3), False).build(msgs)
    on = PromptBuilder.from_config(load_config().data, str(qwen3), False).build(msgs)
    assert off.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.prompt.endswith("<|im_start|>assistant\n") and off.input_ids[:len(on.input_ids)] == on.input_ids
    # the run's protocol, written and read back as eval reads it; eval's builder under the trained protocol
    prompt_protocol(cfg).write(tmp_path)
    gen = TrainedPrompts.read(tmp_path).generation()
    assert PromptBuilder(str(qwen3), False, gen.min_pixels, gen.max_pixels,
                         gen.chat_template_kwargs).build(msgs).input_ids == off.input_ids
    # the flag sets it for any protocol; unset, the settings dict (and so its hash) has no such field
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["b.json", "--model", "m", "--out", "o",
                         "--chat-template-kwargs", '{"enable_thinking": false}'])
    s = settings_from(args, "spark", "m")
    assert s.generation.chat_template_kwargs == {"enable_thinking": False}
    assert s.to_dict()["generation"]["chat_template_kwargs"] == {"enable_thinking": False}
    plain = settings_from(p.parse_args(["b.json", "--model", "m", "--out", "o"]), "spark", "m")
    assert "chat_template_kwargs" not in plain.to_dict()["generation"] and isinstance(plain, EvalSettings)
    assert dataclasses.replace(plain.generation, chat_template_kwargs={}).max_tokens == plain.generation.max_tokens
    with pytest.raises(SystemExit):
        p.parse_args(["b.json", "--model", "m", "--out", "o", "--chat-template-kwargs", "enable_thinking"])


@pytest.mark.parametrize("override,field", [("data.chat_template_kwargs=[1]", "data.chat_template_kwargs"),
                                            ("data.chat_template_kwargs.tools=[1]", "data.chat_template_kwargs.tools")])
def test_chat_template_arguments_are_checked_by_field(override, field):
    from megatron_spark.config import load_config

    with pytest.raises(ValueError, match=f"config field '{field}'"):
        load_config(None, [override])
