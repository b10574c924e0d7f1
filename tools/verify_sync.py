#!/usr/bin/env python
"""Check the Megatron -> vLLM weight sync end to end, token by token.

    python tools/verify_sync.py --hf-dir HF --train-tp 2 --train-pp 1 --rollout-tp 2 [--rounds 2]

Builds the Megatron model from the HF weights at TP x PP, perturbs it as a training step would, syncs it through
the bridge into a colocated vLLM engine of TP --rollout-tp, and compares vLLM's greedy tokens and per-token
logprobs with the Megatron model's own forward on the same sequences (and greedy tokens with HF generate).
Re-run once per round so stale weights show. With --inplace-layout, each round also writes the in-place target
('vllm_tp', the GPU default) into zeroed copies of vLLM's weights and compares them bit for bit with what vLLM's
own loaders make of the same weights. Exits 1 beyond tolerance. Relaunches itself under torchrun when
started as a plain script (world = lcm of the two layouts' sizes).

(A thin wrapper: the same as `megatron-spark verify-sync ...`.)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from megatron_spark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(['verify-sync', *sys.argv[1:]]))
