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

(A thin wrapper: the same as `megatron-spark convert megatron-to-hf ...`.)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from megatron_spark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(['convert', 'megatron-to-hf', *sys.argv[1:]]))
