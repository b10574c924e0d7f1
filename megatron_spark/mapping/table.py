"""The weight table every family's map expands into, read both ways: Megatron parameter <-> HF tensors.

A family gives its declarative rules (`ModelFamily.weight_rules`); `WeightMap` expands them per layer and is what the
converters, the bridge, the planner's parameter counts and checkpoint verification consume. Megatron names are those
of megatron-core's local layer spec (`input_layernorm`, `pre_mlp_layernorm`); with the Transformer Engine spec the
norms are fused into the next linear and `to_te_name` renames them. HF names are checkpoint names (`model.layers.*`,
`visual.*`, `lm_head`); the transformers-5 in-memory prefixes (`model.language_model.*`, `model.visual.*`) are
accepted on input by `canonical_hf_name`.
"""
from __future__ import annotations

import re

from megatron_spark.mapping.transforms import ParamMap, padded_vocab_size
from megatron_spark.models.hf_config import ModelShape

class WeightMap:
    """All concrete parameter maps of one model, indexed both ways."""

    def __init__(self, shape: ModelShape, make_vocab_size_divisible_by: int = 128, tp: int = 1):
        self.shape = shape
        t = shape.text
        self.padded_vocab = padded_vocab_size(t.vocab_size, make_vocab_size_divisible_by, tp)
        rules = shape.kind.weight_rules(shape, self.padded_vocab)
        self.params: list[ParamMap] = []
        for r in rules:
            for i in range(r.layers) if r.layers else [None]:
                fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
                self.params.append(ParamMap(fmt(r.megatron), tuple(fmt(h) for h in r.hf), r.transform))
        self._by_mg = {p.megatron: p for p in self.params}

    @property
    def tied(self) -> bool:
        return self.shape.text.tied_embeddings

    def __getitem__(self, megatron_name: str) -> ParamMap:
        try:
            return self._by_mg[megatron_name]
        except KeyError:
            raise KeyError(f"no HF mapping for megatron parameter '{megatron_name}'") from None

    def __contains__(self, megatron_name: str) -> bool:
        return megatron_name in self._by_mg

    def hf_names(self) -> list[str]:
        """Every HF tensor name of the checkpoint, in table order, each once."""
        seen: dict[str, None] = {}
        for p in self.export_params():
            for n in p.hf:
                seen.setdefault(n, None)
        return list(seen)

    def export_params(self) -> list[ParamMap]:
        """The params that define the HF checkpoint (the tied output layer copy is not exported twice)."""
        out_name = self.shape.kind.megatron_prefix + "output_layer.weight"
        return [p for p in self.params if not (self.tied and p.megatron == out_name)]


_TE_RENAMES = (
    (re.compile(r"\.input_layernorm\.weight$"), ".self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"\.pre_mlp_layernorm\.weight$"), ".mlp.linear_fc1.layer_norm_weight"),
)


def to_te_name(name: str) -> str:
    for pat, repl in _TE_RENAMES:
        name = pat.sub(repl, name)
    return name


def from_te_name(name: str) -> str:
    name = name.replace(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight")
    return name.replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight")


def canonical_hf_name(name: str) -> str:
    """Map transformers-5 in-memory names onto the checkpoint names the tables use."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor that a checkpoint of this config holds (the tied lm_head is absent)."""
    return shape.kind.hf_shapes(shape)
