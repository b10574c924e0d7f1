"""torchrun worker (2 ranks): the bridge's FP8 rollout weights from a Megatron TP=2 model, saved for the test to
compare with nvidia-modelopt's quantization of the same HF tensors.

Usage: torchrun --nproc-per-node 2 tests/dist/quant_worker.py OUT_DIR HF_DIR [HF_DIR ...]
For the i-th model, writes under OUT_DIR/i/: hf_full_rank{r}.pt (every tensor of the 'hf_full' stream with
rollout.quantization=fp8: FP8 weights and their scales by HF name, the rest unchanged), emulated_rank{r}.pt (the same stream for an
engine without FP8 kernels) and vllm_tp{R}_rank{r}.pt (vLLM's fused shards for rollout TP R = 1, 2 from the
in-place plan, quantized as the bridge quantizes any shard of rows).
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    from megatron.core import parallel_state as ps

    from megatron_spark.parallel import ParallelLayout

    for i, hf_dir in enumerate(sys.argv[2:]):
        out = Path(sys.argv[1]) / str(i)
        out.mkdir(parents=True, exist_ok=True)
        layout = ParallelLayout(tp=2, pp=1, world_size=int(os.environ["WORLD_SIZE"]))
        layout.initialize(seed=1)
        save_fp8_streams(hf_dir, layout, out)
        ps.destroy_model_parallel()
    dist.barrier()


def save_fp8_streams(hf_dir: str, layout, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from megatron_spark.bridge.planner import vllm_shard_shapes
    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import HFCheckpoint, load_hf_into_megatron
    from megatron_spark.quant.fp8 import quantized_stream

    shape = load_hf_config(hf_dir)
    wmap = WeightMap(shape, tp=2)
    chunks = build_model(shape, layout, dtype=torch.float32)
    load_hf_into_megatron(chunks, wmap, HFCheckpoint(hf_dir), ps.get_tensor_model_parallel_rank(), 2)
    me = dist.get_rank()
    for name, emulate in (("hf_full", False), ("emulated", True)):
        sync = WeightSync(chunks, wmap, layout, rollout_tp=2, target="hf_full", bucket_mb=1, quantization="fp8",
                          emulate=emulate)
        torch.save({n: t.clone() for n, t in sync.stream()}, out / f"{name}_rank{me}.pt")
    for rollout_tp in (1, 2):
        shapes = vllm_shard_shapes(wmap, expected_hf_shapes(shape), rollout_tp, me % rollout_tp)
        targets = {n: torch.zeros(s) for n, (s, _) in shapes.items()}
        sync = WeightSync(chunks, wmap, layout, rollout_tp=rollout_tp, target="vllm_tp", bucket_mb=1,
                          engine_params=targets)
        sync.run_inplace()
        torch.save(dict(quantized_stream(targets.items(), emulate=False, is_fp8=wmap.shape.kind.fp8_quantizable)),
                   out / f"vllm_tp{rollout_tp}_rank{me}.pt")


if __name__ == "__main__":
    main()
