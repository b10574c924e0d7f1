"""Parameter counts of a model, per pipeline stage and tensor-parallel rank, exactly as this project builds it.

The counts come from the same declarative weight tables the converters use (`mapping/table.py`, filled by each
family: every Megatron parameter, the HF tensors it is made of, and the dimension TP splits), so they follow the
model as built: the vision tower and the embedding on the first stage, the final norm and output layer on the last
(a tied model keeps an output-layer copy on the last stage when PP > 1), the vocabulary padded to lcm(128, TP),
replicated norms and row-parallel biases whole on every TP rank. Pure Python: no torch model, no download.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Optional

from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
from megatron_spark.mapping.transforms import VocabPad
from megatron_spark.models.hf_config import ModelShape, parse_hf_config
from megatron_spark.parallel import stage_layers

_VISION = dict(depth=32, hidden_size=1280, num_heads=16, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
               window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)


def _vl(hidden: int, ffn: int, layers: int, heads: int, kv: int, vision_ffn: int) -> dict:
    text = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=128000, tie_word_embeddings=False,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], **text, "text_config": text,
            "vision_config": {**_VISION, "intermediate_size": vision_ffn, "out_hidden_size": hidden},
            "image_token_id": 151655, "vision_start_token_id": 151652}


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, kv: int, tied: bool) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 128,
            "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960,
            "tie_word_embeddings": tied, "attention_bias": False}


BUILTIN: dict[str, dict] = {
    "qwen2.5-vl-7b": _vl(3584, 18944, 28, 28, 4, 3420),
    "qwen2.5-vl-32b": _vl(5120, 27648, 64, 40, 8, 3456),
    "qwen2.5-vl-72b": _vl(8192, 29568, 80, 64, 8, 3456),
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False},
    # the released config.json files' shapes (head_dim 128 at every size, q/k norms, no qkv bias)
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tied=False),
}


def load_model(name_or_path: str) -> ModelShape:
    """A built-in name (see BUILTIN), or what `--model` names everywhere else: a HF directory (or its config.json)
    or a Megatron checkpoint written by this project (its root or an iteration; the model it holds)."""
    if name_or_path in BUILTIN:
        return parse_hf_config(BUILTIN[name_or_path], name_or_path)
    from megatron_spark.io.checkpoint_layout import is_megatron_checkpoint, resolve_checkpoint

    p = Path(name_or_path)
    if p.is_dir() and is_megatron_checkpoint(p):
        from megatron_spark.convert.layout import read_model_metadata

        root, _ = resolve_checkpoint(p, "--model")
        return parse_hf_config(read_model_metadata(root)["hf_config"], str(root))
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"--model '{name_or_path}': not a built-in name ({', '.join(BUILTIN)}), a HF directory, "
                         f"a config.json nor a Megatron checkpoint")
    return parse_hf_config(json.loads(p.read_text()), str(p))


@dataclass(frozen=True)
class ParamCounts:
    total: int            # the HF checkpoint's parameters
    language: int
    vision: int


def param_counts(shape: ModelShape) -> ParamCounts:
    shapes = expected_hf_shapes(shape)
    tower = {h for p in WeightMap(shape).export_params() if p.megatron.startswith("vision_model.") for h in p.hf}
    vision = sum(prod(shapes[n]) for n in tower)
    total = sum(prod(s) for s in shapes.values())
    return ParamCounts(total, total - vision, vision)


@dataclass(frozen=True)
class StageParams:
    """Elements held by one rank of a pipeline stage (the same on every TP rank of it)."""
    stage: int
    layers: int
    text: int             # embedding / transformer layers / final norm / output layer on this rank
    vision: int           # the vision tower (first stage only)
    frozen: int = 0       # of those, the elements `model.freeze` leaves alone (no gradient, no optimizer state)

    @property
    def total(self) -> int:
        return self.text + self.vision


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


def stage_params(shape: ModelShape, tp: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                 make_vocab_size_divisible_by: int = 128, freeze: tuple[str, ...] = ()) -> list[StageParams]:
    """Per-rank parameter elements of every pipeline stage at TP x PP (uneven stages as `stage_layers` splits),
    and how many of them `freeze` (model.freeze's groups and patterns) leaves out of the update."""
    from megatron_spark.models.freeze import frozen
    wmap = WeightMap(shape, make_vocab_size_divisible_by, tp=tp)
    hf = expected_hf_shapes(shape)
    layers = stage_layers(shape.text.num_layers, pp, first, last)
    bounds = [sum(layers[:k]) for k in range(pp + 1)]
    text, vision, still = [0] * pp, [0] * pp, [0] * pp
    for p in wmap.params:
        if isinstance(p.transform, VocabPad):
            n = wmap.padded_vocab * hf[p.hf[0]][1]
        else:
            n = sum(prod(hf[h]) for h in p.hf)
        per_rank = n // tp if p.transform.tp_dim is not None else n
        is_vision = p.megatron.startswith("vision_model.")
        m = _LAYER.search(p.megatron)
        if is_vision or "embedding." in p.megatron:
            stage = 0
        elif m is not None:
            i = int(m.group(1))
            stage = next(k for k in range(pp) if bounds[k] <= i < bounds[k + 1])
        else:  # final norm, output layer
            stage = pp - 1
            if p.megatron.endswith("output_layer.weight") and shape.text.tied_embeddings and pp == 1:
                continue  # PP = 1: the output layer is the embedding itself
        (vision if is_vision else text)[stage] += per_rank
        if freeze and frozen(p.megatron, list(freeze)):
            still[stage] += per_rank
    return [StageParams(k, layers[k], text[k], vision[k], still[k]) for k in range(pp)]


def kv_bytes_per_token(shape: ModelShape, tp: int = 1, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token on one GPU of a vLLM engine at TP (KV heads are replicated when TP > heads)."""
    t = shape.text
    heads = max(1, t.num_kv_heads // tp) if tp <= t.num_kv_heads else 1
    return 2 * t.num_layers * heads * t.head_dim * dtype_bytes
