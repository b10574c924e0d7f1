#!/usr/bin/env python
"""Check a megatron checkpoint against its HF model, logit by logit.

    python tools/convert/verify.py --hf-dir HF --ckpt CKPT --tp 2 --pp 1
    python tools/convert/verify.py --hf-dir HF --ckpt CKPT --tp 1 2 --pp 1 2     # all four layouts, one launch

Builds the Megatron model at each TP x PP, loads CKPT through dist-checkpointing (resharding), runs text inputs
(and two image+text inputs for Qwen2.5-VL) and compares the full-vocabulary logits with HF transformers, both in
fp32. Prints max |logit difference| and argmax agreement per layout and input; exits 1 beyond --atol, 2 on bad
input. Relaunches itself under torchrun on this node (world = lcm of the TP x PP products); started by your own
torchrun/srun (e.g. across nodes) it runs in place, with a world that every TP x PP divides. For a training
checkpoint, HF is the model it started from: expect differences, use this on converted checkpoints and exports.

(A thin wrapper: the same as `megatron-spark convert verify ...`.)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from megatron_spark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(['convert', 'verify', *sys.argv[1:]]))
