"""A model as the rest of the code sees it: its family, and its typed shapes read from a HF `config.json`.

A model family is one object that answers every question that differs between families, so no other module
compares family names or imports a family's files: how to read its `config.json` into shapes, which Megatron module
to build for a pipeline stage (megatron-core's layer spec and config), the two-way weight table between Megatron
and HF names (from which the converters, the bridge, the planner's parameter counts and checkpoint verification all
follow), how vLLM names and fuses its parameters, which linears the rollout engine holds in FP8, and which
transformers class loads it as the numerical oracle. The families live in `megatron_spark/families/` (one module
each, `families/qwen.py` the reference) and are found through the registry below, by name (checkpoints) or by HF
architecture (config.json). docs/architecture.md has the checklist for adding one.

Pure Python: no torch, megatron-core or transformers import here.
"""
from __future__ import annotations

import importlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

    from megatron_spark.mapping.transforms import ParamMap, Rule


@dataclass(frozen=True)
class ModelFamily:
    """The identity of a family and the questions every family answers (subclasses implement the methods)."""
    name: str                 # ModelShape.family, as checkpoints record it
    hf_architecture: str      # config.json's `architectures` entry that selects this family
    multimodal: bool          # a vision tower, images in prompts
    megatron_prefix: str      # where the language model's parameters sit in our Megatron module
    # the architecture vLLM loads the checkpoint as (None: `hf_architecture`); a family vLLM knows under another
    # name says it here and the engine builder passes it as an override
    vllm_architecture: Optional[str] = None
    # the transformers auto class modelopt's export loads the model with (None: no tested modelopt export)
    modelopt_auto_class: Optional[str] = None

    @property
    def engine_architecture(self) -> str:
        return self.vllm_architecture or self.hf_architecture

    def parse_config(self, cfg: dict, source: str) -> "ModelShape":
        """`config.json` as typed shapes; refuses, by field, variants the model and the tables do not build."""
        raise NotImplementedError

    def weight_rules(self, shape: "ModelShape", padded_vocab: int) -> list["Rule"]:
        """The declarative Megatron <-> HF table (per-layer rules carry `{i}`); `mapping.table.WeightMap` expands
        it for every consumer."""
        raise NotImplementedError

    def hf_shapes(self, shape: "ModelShape") -> dict[str, tuple[int, ...]]:
        """The shape of every tensor a HF checkpoint of this config holds."""
        raise NotImplementedError

    def build_stage(self, shape: "ModelShape", layout, **build) -> "torch.nn.Module":
        """The Megatron module of one (virtual) pipeline stage; `build` is `models.build.build_model`'s keywords:
        dtype, use_te, pre_process, post_process, vp_stage, make_vocab_size_divisible_by, recompute."""
        raise NotImplementedError

    def vllm_name(self, param: "ParamMap") -> str:
        """vLLM's name for the engine parameter a Megatron parameter becomes (fused names where vLLM fuses)."""
        raise NotImplementedError

    def fp8_quantizable(self, name: str) -> bool:
        """Does the rollout engine hold this (HF or vLLM) weight in FP8?"""
        raise NotImplementedError

    def fp8_ignore(self, shape: "ModelShape") -> list[str]:
        """The modules an FP8 checkpoint's `quantization_config` names as left in full precision (the patterns
        vLLM's modelopt loader matches), consistent with `fp8_quantizable`."""
        raise NotImplementedError

    def modelopt_exclude(self) -> tuple[str, ...]:
        """modelopt quantizer-name patterns kept in full precision in an export (and its calibration)."""
        return ()

    def hf_model_class(self) -> Any:
        """The transformers class that loads a HF directory of this family (the numerical oracle, the
        transformers rollout backend)."""
        raise NotImplementedError


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
    def kind(self) -> ModelFamily:
        """The family object that answers everything that differs between families."""
        return get(self.family)

    @property
    def multimodal(self) -> bool:
        return self.kind.multimodal


# The registry. Adding a family is one module in megatron_spark/families/ that defines its `ModelFamily` objects
# in a `FAMILIES` tuple, plus its line in BUILTIN_MODULES. A family that lives outside this package (a lab's own
# model) is loaded the same way from the modules named in MEGATRON_SPARK_FAMILIES (comma-separated import paths),
# which every process of a run inherits: torchrun ranks, engines, converters.
BUILTIN_MODULES = (
    "megatron_spark.families.qwen",
)
PLUGIN_ENV = "MEGATRON_SPARK_FAMILIES"

_REGISTRY: dict[str, ModelFamily] = {}
_LOADED: set[str] = set()
_LOADING: set[str] = set()  # (a family module that asks the registry while it imports is not loaded twice)
_LOCK = threading.RLock()  # (the evaluation's threads may ask first; a family module may ask while it loads)


class FamilyRegistryError(ValueError):
    """The registry cannot be built: a family module does not import, or two families claim one name or
    architecture. Never means "this model is not supported" (that is a plain ValueError from `for_hf_config`)."""


def _clash(family: ModelFamily, known: dict[str, ModelFamily]) -> Optional[ModelFamily]:
    return next((o for o in known.values() if o is not family and (
        o.name == family.name or o.hf_architecture == family.hf_architecture)), None)


def register(family: ModelFamily) -> None:
    """Add a family. Its name and its HF architecture must both be new: a second family claiming either would make
    checkpoints or configs ambiguous."""
    with _LOCK:
        other = _clash(family, _REGISTRY)
        if other is not None:
            raise FamilyRegistryError(
                f"model family {family.name!r} ({family.hf_architecture}) clashes with the registered "
                f"{other.name!r} ({other.hf_architecture}); give it its own name and architecture")
        _REGISTRY[family.name] = family


def _load() -> None:
    plugins = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    with _LOCK:
        for module in (*BUILTIN_MODULES, *plugins):
            if module in _LOADED or module in _LOADING:
                continue
            _LOADING.add(module)
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                where = (f"the built-in family module {module!r} does not import ({e}); reinstall megatron-spark"
                         if module in BUILTIN_MODULES else
                         f"{PLUGIN_ENV}: cannot import model-family module {module!r} ({e}); fix the module path "
                         f"or unset {PLUGIN_ENV}")
                raise FamilyRegistryError(where) from e
            finally:
                _LOADING.discard(module)
            new = list(getattr(mod, "FAMILIES", ()))
            for i, family in enumerate(new):  # all of a module's families or none
                other = _clash(family, {**_REGISTRY, **{f"#{j}": f for j, f in enumerate(new[:i])}})
                if other is not None:
                    raise FamilyRegistryError(
                        f"{module}: model family {family.name!r} ({family.hf_architecture}) clashes with "
                        f"{other.name!r} ({other.hf_architecture}); give it its own name and architecture")
            _LOADED.add(module)
            for family in new:
                _REGISTRY[family.name] = family


def families() -> dict[str, ModelFamily]:
    """Every registered family, by name."""
    _load()
    return dict(_REGISTRY)


def get(name: str) -> ModelFamily:
    family = _REGISTRY.get(name)  # (asked per batch through ModelShape.kind: a registered family needs no load)
    if family is not None:
        return family
    known = families()
    if name not in known:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(known)} (a family from another "
                         f"package is loaded through {PLUGIN_ENV})")
    return known[name]


def find_family(cfg: dict) -> Optional[ModelFamily]:
    """The family a HF config belongs to, or None: by `architectures`; a config without one by `model_type`, which
    must then be the family's name."""
    known = families()
    by_arch = {f.hf_architecture: f for f in known.values()}
    archs = cfg.get("architectures") or []
    family = next((by_arch[a] for a in archs if a in by_arch), None)
    if family is None and not archs:
        family = known.get(cfg.get("model_type"))
    return family


def for_hf_config(cfg: dict, source: str = "config.json") -> ModelFamily:
    """`find_family`, or an error naming the architecture and the supported ones."""
    family = find_family(cfg)
    if family is None:
        archs = cfg.get("architectures") or []
        raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                         f"{', '.join(f.hf_architecture for f in families().values())}")
    return family


def parse_hf_config(cfg: dict, source: str = "config.json") -> ModelShape:
    """A HF `config.json` as typed shapes, read by the family its `architectures` name."""
    return for_hf_config(cfg, source).parse_config(cfg, source)


def load_hf_config(hf_dir: str | Path) -> ModelShape:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"'{path}' not found: --hf-dir must be a Hugging Face model directory with config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from e
    return parse_hf_config(cfg, str(path))
