"""The model-family registry (pure): lookup by architecture and by name, the errors a clash or a broken plugin
module gives, and every family answering the questions the rest of the code asks."""
import pytest

from megatron_spark.models import hf_config as families
from megatron_spark.families.qwen import QwenFamily
from megatron_spark.models.hf_config import parse_hf_config

COPY = {"architectures": ["SparkCopyQwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "tie_word_embeddings": True}


@pytest.fixture
def registry():
    """The registry as the package left it, restored afterwards (a test registers families)."""
    saved, loaded = dict(families._REGISTRY), set(families._LOADED)
    yield families
    families._REGISTRY.clear()
    families._REGISTRY.update(saved)
    families._LOADED.clear()
    families._LOADED.update(loaded)


def test_builtin_families_are_found_by_architecture_and_by_name():
    known = families.families()
    assert set(known) >= {"qwen2", "qwen3", "qwen2_5_vl"}
    for name, f in known.items():
        assert families.get(name) is f
        assert families.for_hf_config({"architectures": [f.hf_architecture]}) is f
    assert families.for_hf_config({"model_type": "qwen3"}).name == "qwen3"  # (a config without `architectures`)
    with pytest.raises(ValueError, match=r"x.json: unsupported architecture \['LlamaForCausalLM'\]; supported: "
                                         r"Qwen2ForCausalLM"):
        families.for_hf_config({"architectures": ["LlamaForCausalLM"]}, "x.json")


def test_a_plugin_module_adds_a_family_and_a_broken_one_says_which(registry, monkeypatch):
    with pytest.raises(ValueError, match="unsupported architecture"):
        parse_hf_config(COPY)
    monkeypatch.setenv(families.PLUGIN_ENV, "tests.dist.family_copy")
    shape = parse_hf_config(COPY)
    assert shape.family == "qwen2_copy" and shape.kind.engine_architecture == "Qwen2ForCausalLM"
    qwen2 = parse_hf_config({**COPY, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.kind.engine_architecture == "Qwen2ForCausalLM" and qwen2.text == shape.text
    monkeypatch.setenv(families.PLUGIN_ENV, "tests.dist.family_copy,no_such.family_module")
    with pytest.raises(ValueError, match="MEGATRON_SPARK_FAMILIES: cannot import model-family module "
                                         "'no_such.family_module'"):
        families.families()


def test_a_family_that_claims_a_known_name_or_architecture_is_refused(registry):
    with pytest.raises(ValueError, match="clashes with the registered 'qwen2'"):
        families.register(QwenFamily("qwen2", "OtherForCausalLM", multimodal=False, megatron_prefix=""))
    with pytest.raises(ValueError, match="clashes with the registered 'qwen3'"):
        families.register(QwenFamily("mine", "Qwen3ForCausalLM", multimodal=False, megatron_prefix=""))


def test_the_engine_is_told_the_architecture_vllm_knows(registry, monkeypatch, tmp_path):
    """A family served under another architecture than its config's gets vLLM's `hf_overrides`; the others none."""
    import json

    from megatron_spark.rollout.engine import engine_overrides

    monkeypatch.setenv(families.PLUGIN_ENV, "tests.dist.family_copy")
    (tmp_path / "config.json").write_text(json.dumps(COPY))
    assert engine_overrides(str(tmp_path)) == {"hf_overrides": {"architectures": ["Qwen2ForCausalLM"]}}
    (tmp_path / "config.json").write_text(json.dumps({**COPY, "architectures": ["Qwen2ForCausalLM"]}))
    assert engine_overrides(str(tmp_path)) == {}
