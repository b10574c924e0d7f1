#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen2.5-VL directory into a megatron-core torch_dist checkpoint.

    python tools/convert/hf_to_megatron.py --hf-dir Qwen2.5-VL-32B-Instruct --out ckpt/spark-vl-32b [--dtype bf16]

The output is in the Megatron-LM layout (OUT/iter_0000000/, OUT/latest_checkpointed_iteration.txt) plus
OUT/megatron_spark.json (family, HF config, true and padded vocab, dtype, tool version) and OUT/hf_assets/
(tokenizer, processor, generation config). It loads at ANY TP/PP (dist-checkpointing reshards at load time).
--tp only chooses the vocabulary padding, a multiple of lcm(128, TP): every TP dividing 128 gives the same
checkpoint, so pass it only for a TP like 3 or 6. --pp is only checked against the layer count.
Streams one tensor at a time (peak memory ~ the largest tensor, never the model); writes OUT atomically.

(A thin wrapper: the same as `megatron-spark convert hf-to-megatron ...`.)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from megatron_spark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(['convert', 'hf-to-megatron', *sys.argv[1:]]))
