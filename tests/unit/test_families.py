"""The model-family registry (pure): lookup by architecture and by name, the errors a clash or a broken plugin
module gives, and every family answering the questions the rest of the code asks."""
from dataclasses import dataclass

import pytest

from megatron_spark.families.qwen import QwenFamily
from megatron_spark.mapping.transforms import Rule
from megatron_spark.models import hf_config as families
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


@dataclass(frozen=True)
class OddFamily(QwenFamily):
    """Answers unlike Qwen's, so that a consumer which bypasses the family shows: every HF name under `backbone.`,
    vLLM names with a suffix, FP8 for MLP weights only."""

    def weight_rules(self, shape, padded_vocab):
        return [Rule(r.megatron, tuple("backbone." + h for h in r.hf), r.transform, r.layers)
                for r in super().weight_rules(shape, padded_vocab)]

    def hf_shapes(self, shape):
        return {"backbone." + n: s for n, s in super().hf_shapes(shape).items()}

    def vllm_name(self, param):
        return param.hf[0] + ".odd"

    def fp8_quantizable(self, name):
        return ".mlp." in name

    def fp8_ignore(self, shape):
        return ["backbone.odd"]


def test_every_consumer_asks_the_family(registry):
    """The weight table, the HF shapes, the bridge's plan, the planner's counts, the FP8 stream and the modelopt
    classes follow a family whose answers differ from Qwen's."""
    import torch

    from megatron_spark.bridge.planner import plan
    from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
    from megatron_spark.planner.model import param_counts
    from megatron_spark.quant.export import exportable
    from megatron_spark.quant.fp8 import quantized_stream

    families.register(OddFamily("odd", "OddForCausalLM", multimodal=False, megatron_prefix="",
                                modelopt_auto_class="AutoModelForCausalLM"))
    shape = parse_hf_config({**COPY, "architectures": ["OddForCausalLM"]})
    assert shape.family == "odd"
    wmap, hf = WeightMap(shape), expected_hf_shapes(shape)
    assert wmap.hf_names() and all(n.startswith("backbone.") for n in wmap.hf_names())
    assert set(wmap.hf_names()) == set(hf)
    names = {t.dst_name for t in plan(wmap, hf, 1, 1, lambda name: 0, rollout_tp=1)}
    assert names and all(n.startswith("backbone.") and n.endswith(".odd") for n in names)
    counts = param_counts(shape)
    assert counts.total == counts.language == sum(torch.Size(s).numel() for s in hf.values())
    assert exportable()["OddForCausalLM"] == "AutoModelForCausalLM"
    stream = dict(quantized_stream([("a.mlp.up_proj.weight", torch.ones(2, 2)),
                                    ("a.self_attn.q_proj.weight", torch.ones(2, 2))],
                                   emulate=False, is_fp8=shape.kind.fp8_quantizable))
    assert stream["a.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn and "a.mlp.up_proj.weight_scale" in stream
    assert stream["a.self_attn.q_proj.weight"].dtype == torch.float32


def test_a_module_registers_all_its_families_or_none(registry, monkeypatch, tmp_path):
    """A module whose second family clashes registers neither (and says so every time); a module that asks the
    registry while it imports still registers its families; the engine builder does not swallow a broken
    registry."""
    from megatron_spark.rollout.engine import engine_overrides

    (tmp_path / "clashing_families.py").write_text(
        "from megatron_spark.families.qwen import QwenFamily\n"
        "FAMILIES = (QwenFamily('fine', 'FineForCausalLM', multimodal=False, megatron_prefix=''),\n"
        "            QwenFamily('qwen2', 'OtherForCausalLM', multimodal=False, megatron_prefix=''))\n")
    (tmp_path / "asking_family.py").write_text(
        "from megatron_spark.families.qwen import QwenFamily\n"
        "from megatron_spark.models.hf_config import get\n"
        "BASE = get('qwen2')\n"
        "FAMILIES = (QwenFamily('asking', 'AskingForCausalLM', multimodal=False, megatron_prefix=''),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(families.PLUGIN_ENV, "clashing_families")
    for _ in range(2):
        with pytest.raises(families.FamilyRegistryError, match="clashing_families: model family 'qwen2'"):
            families.families()
    assert "fine" not in families._REGISTRY
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(families.FamilyRegistryError):
        engine_overrides(str(tmp_path / "m"))
    monkeypatch.setenv(families.PLUGIN_ENV, "asking_family")
    assert families.get("asking").hf_architecture == "AskingForCausalLM"
