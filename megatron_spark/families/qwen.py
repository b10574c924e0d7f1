"""The Qwen families: Qwen2 / Qwen2.5 and Qwen3 text models, Qwen2.5-VL.

The config reader is here; the weight tables are in `mapping/qwen.py` and the Megatron modules in `models/qwen.py`.
This module binds them into families, and is the only one the rest of the code reaches them through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_spark.models.hf_config import ModelFamily, ModelShape, TextShape, VisionShape


@dataclass(frozen=True)
class QwenFamily(ModelFamily):
    qk_norm: bool = False     # an RMSNorm over each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = True     # biases on the q/k/v projections (Qwen2 has them; Qwen3 has none)

    def parse_config(self, cfg: dict, source: str) -> ModelShape:
        return qwen_shape(cfg, self, source)

    def weight_rules(self, shape, padded_vocab: int):
        from megatron_spark.mapping.qwen import text_rules, vision_rules

        rules = text_rules(shape.text, self.megatron_prefix, padded_vocab, with_output=True)
        return rules + (vision_rules(shape.vision, "vision_model.") if self.multimodal else [])

    def hf_shapes(self, shape):
        from megatron_spark.mapping.qwen import qwen_hf_shapes

        return qwen_hf_shapes(shape)

    def build_stage(self, shape, layout, **build):
        from megatron_spark.models.qwen import Qwen25VLModel, build_gpt

        if self.multimodal:
            return Qwen25VLModel(shape, layout, **build)
        return build_gpt(shape.text, layout, **build)

    def vllm_name(self, param) -> str:
        """vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (the vision tower's qkv is fused in
        the HF checkpoint already)."""
        from megatron_spark.mapping.transforms import GateUpFuse, QKVInterleave

        n = param.hf[0]
        if isinstance(param.transform, QKVInterleave) and not param.transform.fused_hf:
            return n.replace("q_proj", "qkv_proj")
        if isinstance(param.transform, GateUpFuse):
            return n.replace("gate_proj", "gate_up_proj")
        return n

    def fp8_quantizable(self, name: str) -> bool:
        from megatron_spark.quant.fp8 import quantizable  # (the HF decoder convention: q/k/v/o, gate/up/down)

        return quantizable(name)

    def fp8_ignore(self, shape: ModelShape) -> list[str]:
        return ["lm_head", "model.embed_tokens"] + (["visual*"] if self.multimodal else [])

    def modelopt_exclude(self) -> tuple[str, ...]:
        return ("*visual*",) if self.multimodal else ()

    def hf_model_class(self) -> Any:
        import transformers

        return transformers.Qwen2_5_VLForConditionalGeneration if self.multimodal \
            else transformers.AutoModelForCausalLM


def _rope(cfg: dict) -> tuple[float, Optional[tuple[int, ...]]]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    mrope = params.get("mrope_section") or scaling.get("mrope_section")
    return float(theta), tuple(mrope) if mrope else None


def _refuse_unsupported_attention(text_cfg: dict, kind: "QwenFamily", source: str) -> None:
    """Attention variants a family's config can switch on that the Megatron model and the weight tables do not
    build: refused by name rather than converted into a model that silently differs."""
    if not kind.qkv_bias and text_cfg.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true (biases on q/k/v/o) is not supported for {kind.name}; "
                         f"the released {kind.name} checkpoints have none")
    if text_cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (every layer is built with full "
                         f"attention, as the released {kind.name} checkpoints use); set it to false")


def qwen_shape(cfg: dict, kind: "QwenFamily", source: str) -> ModelShape:
    """The Qwen families' config reader: the transformers-4 layout (text fields at top level, `rope_scaling`) and
    the transformers-5 layout (`text_config`, `rope_parameters`)."""
    family = kind.name
    multimodal = kind.multimodal
    text_cfg = dict(cfg.get("text_config") or cfg) if multimodal else cfg
    theta, mrope = _rope(text_cfg)
    if multimodal and mrope is None:
        theta, mrope = _rope(cfg)
    tied = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    _refuse_unsupported_attention(text_cfg, kind, source)
    heads = text_cfg["num_attention_heads"]
    text = TextShape(
        hidden_size=text_cfg["hidden_size"], ffn_hidden_size=text_cfg["intermediate_size"],
        num_layers=text_cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text_cfg.get("num_key_value_heads", heads),
        head_dim=text_cfg.get("head_dim") or text_cfg["hidden_size"] // heads,
        vocab_size=text_cfg["vocab_size"], rms_norm_eps=float(text_cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, tied_embeddings=tied,
        max_position_embeddings=text_cfg.get("max_position_embeddings", 32768), mrope_section=mrope,
        qkv_bias=kind.qkv_bias, qk_norm=kind.qk_norm)
    vision = None
    if multimodal:
        v = cfg["vision_config"]
        vparams = v.get("rope_parameters") or {}
        vision = VisionShape(
            depth=v["depth"], hidden_size=v["hidden_size"], ffn_hidden_size=v["intermediate_size"],
            num_heads=v["num_heads"], out_hidden_size=v.get("out_hidden_size", text.hidden_size),
            patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2), window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            rope_theta=float(vparams.get("rope_theta", 10000.0)))
        if v.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: vision_config.hidden_act={v.get('hidden_act')!r} is not supported (silu)")
    return ModelShape(family=family, text=text, vision=vision, image_token_id=cfg.get("image_token_id"),
                      vision_start_token_id=cfg.get("vision_start_token_id"), raw=cfg)


FAMILIES = (
    QwenFamily("qwen2", "Qwen2ForCausalLM", multimodal=False, megatron_prefix="",
               modelopt_auto_class="AutoModelForCausalLM"),
    QwenFamily("qwen3", "Qwen3ForCausalLM", multimodal=False, megatron_prefix="", qk_norm=True, qkv_bias=False,
               modelopt_auto_class="AutoModelForCausalLM"),
    QwenFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", multimodal=True, megatron_prefix="language_model.",
               modelopt_auto_class="AutoModelForImageTextToText"),
)
