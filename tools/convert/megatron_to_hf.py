#!/usr/bin/env python
"""Export a megatron-core torch_dist checkpoint (converted, or written by `megatron-spark train` at any TP/PP/VPP)
to a Hugging Face directory that transformers and vLLM load as the original model type.

    python tools/convert/megatron_to_hf.py --ckpt runs/spark-vl-32b/checkpoints --out spark-vl-32b-hf [--iteration 400]

--ckpt is a checkpoint root (the latest iteration is used unless --iteration says otherwise) or one iter_*
directory. The model's HF config and tokenizer come from the checkpoint's megatron_spark.json and hf_assets/;
for a checkpoint written by another tool pass --hf-config-dir with the original HF directory. Writes sharded
safetensors with an index, config.json (dtype updated), generation config and tokenizer/processor files.
Streams one tensor at a time; writes OUT atomically.

    python tools/convert/megatron_to_hf.py --ckpt runs/spark-vl-32b/checkpoints --out spark-vl-32b-fp8 \
        --quantize fp8-per-channel

--quantize FORMAT writes a modelopt-quantized checkpoint for serving instead (vLLM loads it as quant_method
"modelopt"): fp8 (per-tensor, static activation scales: needs --calib-data), fp8-per-channel, w4a16-nvfp4,
nvfp4 (needs a GPU) or int8-wo. See docs/quantization.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint root or iter_* directory")
    ap.add_argument("--out", required=True, help="HF directory to create")
    ap.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration.txt")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the checkpoint's dtype")
    ap.add_argument("--hf-config-dir", help="original HF directory (for checkpoints without megatron_spark.json)")
    ap.add_argument("--max-shard-size-gb", type=float, default=5.0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--quantize", metavar="FORMAT",
                    help="fp8 | fp8-per-channel | w4a16-nvfp4 | nvfp4 | int8-wo (nvidia-modelopt)")
    ap.add_argument("--calib-data", help="Spark data file whose first prompts calibrate activation scales")
    ap.add_argument("--calib-prompts", type=int, default=16, help="prompts used for calibration (default 16)")
    a = ap.parse_args()
    from megatron_spark.convert.converters import megatron_to_hf
    from megatron_spark.convert.output import run_cli

    return run_cli(lambda: megatron_to_hf(a.ckpt, a.out, iteration=a.iteration, dtype=a.dtype,
                                          hf_config_dir=a.hf_config_dir, force=a.force,
                                          max_shard_bytes=int(a.max_shard_size_gb * 2 ** 30),
                                          quantize=a.quantize, calib_data=a.calib_data,
                                          calib_prompts=a.calib_prompts))


if __name__ == "__main__":
    sys.exit(main())
