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
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--ckpt", required=True, help="checkpoint root or iter_* directory")
    ap.add_argument("--iteration", type=int)
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--pp", type=int, nargs="+", default=[1])
    ap.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| allowed (fp32 compute)")
    a = ap.parse_args()
    from megatron_spark.convert.verify import check_inputs, format_report, layouts_world, verify_checkpoint
    from megatron_spark.launch import relaunch_under_torchrun, under_torchrun, worker_exit

    layouts = list(itertools.product(a.tp, a.pp))
    if not under_torchrun():
        try:
            check_inputs(a.hf_dir, a.ckpt, layouts, a.iteration)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return relaunch_under_torchrun(__file__, sys.argv[1:], layouts_world(layouts))

    import torch.distributed as dist

    try:
        results = verify_checkpoint(a.hf_dir, a.ckpt, layouts, a.iteration)
    except ValueError as e:
        rank = int(os.environ["RANK"])
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return worker_exit(2, rank)
    text, ok = format_report(results, a.atol)
    if dist.get_rank() == 0:
        print(text)
        print("verify:", "OK" if ok else f"FAILED (atol {a.atol})", flush=True)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return worker_exit(0 if ok else 1, rank)


if __name__ == "__main__":
    sys.exit(main())
