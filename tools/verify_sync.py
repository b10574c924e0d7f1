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
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--train-tp", type=int, default=1)
    ap.add_argument("--train-pp", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |logprob difference| allowed")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate oracle (large models)")
    ap.add_argument("--inplace-layout", action="store_true",
                    help="also check the in-place target ('vllm_tp') bit for bit against vLLM's own loaders")
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        print(f"error: --hf-dir '{a.hf_dir}' has no config.json", file=sys.stderr)
        return 2
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.parallel import check_model_layout

    try:  # before any process starts or any weight is read
        check_model_layout(load_hf_config(a.hf_dir), a.train_tp, a.train_pp, a.rollout_tp,
                           ("--train-tp", "--train-pp", "--rollout-tp"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = math.lcm(a.train_tp * a.train_pp, a.rollout_tp)
    from megatron_spark.launch import relaunch_under_torchrun, under_torchrun, worker_exit

    if not under_torchrun():
        return relaunch_under_torchrun(__file__, sys.argv[1:], world)

    import torch.distributed as dist

    from megatron_spark.bridge.verify import verify_sync

    res = verify_sync(a.hf_dir, [(a.train_tp, a.train_pp)] * a.rounds, a.rollout_tp, a.bucket_mb,
                      hf_oracle=not a.no_hf, check_inplace=a.inplace_layout)
    ok = True
    if dist.get_rank() == 0:
        print(f"\nMegatron TP={a.train_tp} PP={a.train_pp} -> vLLM TP={a.rollout_tp}, world {world}")
        print(f"{'round':<18} {'tokens':>6} {'greedy':>7} {'HF':>5} {'max|dlogp|':>11} {'MB in':>7} {'sync s':>7}")
        for k, r in res.items():
            good = r["greedy_match"] is not False and r["max_logprob_diff"] <= a.tolerance and r.get("hf_greedy_equal", True)
            inplace = [x for x in r.get("inplace", {}).get("ranks", [])]
            bad = [x for x in inplace if x["mismatched"] or x["unplanned"]]
            if bad:
                print(f"{k}: in-place layout differs from vLLM's loaders: {bad[0]['mismatched'] or bad[0]['unplanned']}")
            ok &= good and not bad
            print(f"{k:<18} {r['tokens']:>6} {({True: 'same', False: 'DIFF'}).get(r['greedy_match'], '-'):>7} "
                  f"{('-' if 'hf_greedy_equal' not in r else 'same' if r['hf_greedy_equal'] else 'DIFF'):>5} "
                  f"{r['max_logprob_diff']:>11.2e} {r.get('bytes_received', 0) / 2**20:>7.2f} "
                  f"{r.get('sync_s', 0):>7.3f}")
        print("verify_sync:", "OK" if ok else f"FAILED (tolerance {a.tolerance})")
    flag = [ok]
    dist.broadcast_object_list(flag, src=0)
    dist.barrier()
    return worker_exit(0 if flag[0] else 1, dist.get_rank())


if __name__ == "__main__":
    sys.exit(main())
