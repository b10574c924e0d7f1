"""`megatron-spark verify-sync`: the Megatron -> vLLM weight sync checked end to end (tools/verify_sync.py is a
thin wrapper). Lives with the bridge because it drives the trainer's model and a vLLM engine; the converters
(convert/cli.py) stay below that layer."""
from __future__ import annotations

import argparse
import math
import os

DOC = """Check the Megatron -> vLLM weight sync end to end, token by token.

    megatron-spark verify-sync --hf-dir HF --train-tp 2 --train-pp 1 --rollout-tp 2 [--rounds 2]

Builds the Megatron model from the HF weights at TP x PP, perturbs it as a training step would, syncs it through
the bridge into a colocated vLLM engine of TP --rollout-tp, and compares vLLM's greedy tokens and per-token
logprobs with the Megatron model's own forward on the same sequences (and greedy tokens with HF generate).
Re-run once per round so stale weights show. With --inplace-layout, each round also writes the in-place target
('vllm_tp', the GPU default) into zeroed copies of vLLM's weights and compares them bit for bit with what vLLM's
own loaders make of the same weights. Exits 1 beyond tolerance. Relaunches itself under torchrun when
started as a plain script (world = lcm of the two layouts' sizes).
"""


def add_verify_sync_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="HF model directory")
    p.add_argument("--train-tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--train-pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--rollout-tp", type=int, default=1, help="vLLM tensor-parallel size")
    p.add_argument("--rounds", type=int, default=2, help="perturb-and-sync rounds")
    p.add_argument("--bucket-mb", type=int, default=256, help="sync bucket size")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |logprob difference| allowed")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate oracle (large models)")
    p.add_argument("--inplace-layout", action="store_true",
                   help="also check the in-place target ('vllm_tp') bit for bit against vLLM's own loaders")


def run_verify_sync(a) -> int:
    if not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        raise ValueError(f"--hf-dir '{a.hf_dir}' has no config.json")
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.parallel import check_model_layout

    # before any process starts or any weight is read
    check_model_layout(load_hf_config(a.hf_dir), a.train_tp, a.train_pp, a.rollout_tp,
                       ("--train-tp", "--train-pp", "--rollout-tp"))
    world = math.lcm(a.train_tp * a.train_pp, a.rollout_tp)
    from megatron_spark.launch import relaunch_under_torchrun, under_torchrun, worker_exit

    if not under_torchrun():
        return relaunch_under_torchrun(a.argv, world)

    import torch.distributed as dist

    from megatron_spark.bridge.verify import verify_sync

    res = verify_sync(a.hf_dir, [(a.train_tp, a.train_pp)] * a.rounds, a.rollout_tp, a.bucket_mb,
                      hf_oracle=not a.no_hf, check_inplace=a.inplace_layout)
    ok = True
    if dist.get_rank() == 0:
        print(f"\nMegatron TP={a.train_tp} PP={a.train_pp} -> vLLM TP={a.rollout_tp}, world {world}")
        print(f"{'round':<18} {'tokens':>6} {'greedy':>7} {'HF':>5} {'max|dlogp|':>11} {'MB in':>7} {'sync s':>7}")
        for k, r in res.items():
            good = r["greedy_match"] is not False and r["max_logprob_diff"] <= a.tolerance and \
                r.get("hf_greedy_equal", True)
            bad = [x for x in r.get("inplace", {}).get("ranks", []) if x["mismatched"] or x["unplanned"]]
            if bad:
                print(f"{k}: in-place layout differs from vLLM's loaders: "
                      f"{bad[0]['mismatched'] or bad[0]['unplanned']}")
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
