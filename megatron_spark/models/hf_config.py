"""Read an HF Qwen2 / Qwen2.5 / Qwen3 / Qwen2.5-VL `config.json` into typed shapes (no transformers import needed).

Handles both the transformers-4 layout (text fields at top level, `rope_scaling`) and the transformers-5 layout
(`text_config`, `rope_parameters`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

@dataclass(frozen=True)
class Family:
    """What differs between the supported model families, said once (the rest of the code asks the family instead
    of comparing names)."""
    name: str                 # ModelShape.family, as checkpoints record it
    hf_architecture: str      # config.json's `architectures`
    multimodal: bool          # a vision tower, images in prompts
    megatron_prefix: str      # where the language model's parameters sit in our Megatron module
    qk_norm: bool = False     # an RMSNorm over each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = True     # biases on the q/k/v projections (Qwen2 has them; Qwen3 has none)


FAMILIES = {f.name: f for f in (
    Family("qwen2", "Qwen2ForCausalLM", multimodal=False, megatron_prefix=""),
    Family("qwen3", "Qwen3ForCausalLM", multimodal=False, megatron_prefix="", qk_norm=True, qkv_bias=False),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", multimodal=True, megatron_prefix="language_model."),
)}
ARCHITECTURES = {f.hf_architecture: f.name for f in FAMILIES.values()}


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tied_embeddings: bool
    max_position_embeddings: int
    mrope_section: Optional[tuple[int, ...]] = None
    qkv_bias: bool = True
    qk_norm: bool = False


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ModelShape:
    family: str
    text: TextShape
    vision: Optional[VisionShape] = None
    image_token_id: Optional[int] = None
    vision_start_token_id: Optional[int] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def kind(self) -> Family:
        return FAMILIES[self.family]

    @property
    def multimodal(self) -> bool:
        return self.kind.multimodal


def _rope(cfg: dict) -> tuple[float, Optional[tuple[int, ...]]]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    mrope = params.get("mrope_section") or scaling.get("mrope_section")
    return float(theta), tuple(mrope) if mrope else None


def _refuse_unsupported_attention(text_cfg: dict, kind: Family, source: str) -> None:
    """Attention variants a family's config can switch on that the Megatron model and the weight tables do not
    build: refused by name rather than converted into a model that silently differs."""
    if not kind.qkv_bias and text_cfg.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true (biases on q/k/v/o) is not supported for {kind.name}; "
                         f"the released {kind.name} checkpoints have none")
    if text_cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (every layer is built with full "
                         f"attention, as the released {kind.name} checkpoints use); set it to false")


def parse_hf_config(cfg: dict, source: str = "config.json") -> ModelShape:
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and not archs:  # only configs without `architectures` are identified by model_type
        mt = cfg.get("model_type")
        family = mt if mt in FAMILIES else None
    if family is None:
        raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    multimodal = FAMILIES[family].multimodal
    text_cfg = dict(cfg.get("text_config") or cfg) if multimodal else cfg
    theta, mrope = _rope(text_cfg)
    if multimodal and mrope is None:
        theta, mrope = _rope(cfg)
    tied = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    kind = FAMILIES[family]
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


def load_hf_config(hf_dir: str | Path) -> ModelShape:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"'{path}' not found: --hf-dir must be a Hugging Face model directory with config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from e
    return parse_hf_config(cfg, str(path))
