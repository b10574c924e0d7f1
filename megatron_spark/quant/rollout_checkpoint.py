"""The FP8 checkpoint a CUDA vLLM engine starts from when rollouts are FP8 (rollout.quantization=fp8).

Written by streaming the HF directory through `quant/fp8.py`, one tensor in memory at a time: no model is built and
nvidia-modelopt is not needed. The result is modelopt's FP8_PER_CHANNEL_PER_TOKEN layout -- FP8 weights with a
`weight_scale` per output row for the language model's linear layers, everything else as it was,
`quantization_config` (quant_method "modelopt") in config.json and hf_quant_config.json -- byte-equal to modelopt's
own export of the same directory (tests/unit/test_quant.py), which vLLM loads with its FP8 layers. Every later
sync replaces those weights and scales with the trainer's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_spark.convert.layout import copy_hf_assets
from megatron_spark.convert.output import begin_output, finish_output
from megatron_spark.io.safetensors import HFCheckpoint, ShardedSafetensorsWriter, TensorSpec
from megatron_spark.models.hf_config import parse_hf_config
from megatron_spark.quant.fp8 import quantize_fp8, scale_name

QUANT_ALGO = "FP8_PER_CHANNEL_PER_TOKEN"
PRODUCER = {"name": "modelopt", "version": "0.47.0"}  # the checkpoint format version this writes


def write_fp8_checkpoint(hf_dir: str | Path, out: str | Path, *, force: bool = False,
                         max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """HF directory -> the rollout engine's FP8 checkpoint in `out` (written atomically)."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    shape = parse_hf_config(cfg, str(hf_dir / "config.json"))
    quantizable = shape.kind.fp8_quantizable
    ckpt = HFCheckpoint(hf_dir)
    names = ckpt.keys()
    specs: list[TensorSpec] = []
    for n in names:
        if quantizable(n):
            specs += [TensorSpec(n, ckpt.shape(n), torch.float8_e4m3fn),
                      TensorSpec(scale_name(n), (ckpt.shape(n)[0],), torch.float32)]
        else:
            specs.append(TensorSpec(n, ckpt.shape(n), ckpt.dtype(n)))
    ignore = shape.kind.fp8_ignore(shape)
    tmp = begin_output(out, force)
    try:
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes)
        for n in names:
            t = ckpt.get(n)
            if quantizable(n):
                q, s = quantize_fp8(t)
                writer.write(n, q)
                writer.write(scale_name(n), s)
            else:
                writer.write(n, t)
        writer.close()
        ckpt.close()
        copy_hf_assets(hf_dir, tmp)  # tokenizer, processor, chat template (config.json is rewritten below)
        cfg["quantization_config"] = {"ignore": ignore, "quant_algo": QUANT_ALGO, "producer": PRODUCER,
                                      "quant_method": "modelopt"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "hf_quant_config.json").write_text(json.dumps(
            {"producer": PRODUCER, "quantization": {"quant_algo": QUANT_ALGO, "kv_cache_quant_algo": None,
                                                    "exclude_modules": ignore}}, indent=4))
        return finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
