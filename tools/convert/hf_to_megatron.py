#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen2.5-VL directory into a megatron-core torch_dist checkpoint.

    python tools/convert/hf_to_megatron.py --hf-dir Qwen2.5-VL-32B-Instruct --out ckpt/spark-vl-32b [--dtype bf16]

The output is in the Megatron-LM layout (OUT/iter_0000000/, OUT/latest_checkpointed_iteration.txt) plus
OUT/megatron_spark.json (family, HF config, true and padded vocab, dtype, tool version) and OUT/hf_assets/
(tokenizer, processor, generation config). It loads at ANY TP/PP (dist-checkpointing reshards at load time).
--tp only chooses the vocabulary padding, a multiple of lcm(128, TP): every TP dividing 128 gives the same
checkpoint, so pass it only for a TP like 3 or 6. --pp is only checked against the layer count.
Streams one tensor at a time (peak memory ~ the largest tensor, never the model); writes OUT atomically.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="checkpoint root to create")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the HF weights' dtype")
    ap.add_argument("--tp", type=int, default=1, help="only affects vocabulary padding (see above)")
    ap.add_argument("--pp", type=int, default=1, help="only validated against the layer count")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync of each file (faster, less crash-safe)")
    a = ap.parse_args()
    from megatron_spark.convert.converters import hf_to_megatron
    from megatron_spark.convert.output import run_cli

    return run_cli(lambda: hf_to_megatron(a.hf_dir, a.out, dtype=a.dtype, tp=a.tp, pp=a.pp, force=a.force,
                                          sync_files=not a.no_fsync))


if __name__ == "__main__":
    sys.exit(main())
