#!/usr/bin/env python
"""FP8 rollouts end to end on one GPU: the bridge's FP8 sync into a live vLLM engine (quant_method modelopt,
FP8 per channel) against a second engine loaded from modelopt's FP8 export of the same weights.

    python scripts/fp8_rollout_check.py OUT_DIR [--dry-run]

1. a tiny Qwen2 (bf16 on GPU), its FP8 checkpoint as training writes it (quant/rollout_checkpoint.py) -> engine A;
2. the Megatron model (TP=1, world 1) is perturbed as an update would, and `WeightSync(quantization='fp8')` streams
   FP8 weights and scales into engine A through vLLM's own loader;
3. the perturbed weights are exported to HF and quantized by modelopt -> engine B;
4. greedy tokens of A and B must be equal (they hold the same bytes), and differ from A before the sync.
With --dry-run (no CUDA vLLM, e.g. CI or the lent GPU machine), steps 1-3 run without engines and the stream's
FP8 tensors are compared byte for byte with engine B's checkpoint instead. Prints one JSON line; exit 1 on a
mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true", help="no vLLM: compare the stream with the FP8 export")
    a = ap.parse_args()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.bridge.verify import perturb_
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import HFCheckpoint, export_megatron_to_hf, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.quant.export import quantize_hf
    from megatron_spark.quant.rollout_checkpoint import write_fp8_checkpoint
    from megatron_spark.fixtures.tiny import build_qwen2

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    hf = build_qwen2(out / "hf", hidden=256, heads=4, kv_heads=2, ffn=512, layers=2, tied=False, seed=7)
    shape = load_hf_config(str(hf))
    layout = ParallelLayout(tp=1, pp=1, world_size=1)
    layout.initialize(seed=1)
    wmap = WeightMap(shape, tp=1)
    chunks = build_model(shape, layout, dtype=dtype)
    load_hf_into_megatron(chunks, wmap, HFCheckpoint(str(hf)), 0, 1)
    start = write_fp8_checkpoint(hf, out / "fp8_start")
    perturb_(chunks, wmap, seed=1)
    trained = out / "hf_trained"
    shutil.copytree(hf, trained)
    state = export_megatron_to_hf(chunks, wmap, ps.get_tensor_model_parallel_group())
    save_file({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in state.items()},
              str(trained / "model.safetensors"))
    expected = quantize_hf(trained, out / "fp8_trained", "fp8-per-channel").out
    sync = WeightSync(chunks, wmap, layout, rollout_tp=1, target="hf_full", quantization="fp8",
                      emulate=False)
    result: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    if a.dry_run:
        want = load_file(str(next(expected.glob("*.safetensors"))))
        got = {n: t.cpu() for n, t in sync.stream()}
        fp8 = [n for n, t in want.items() if t.dtype == torch.float8_e4m3fn]
        # the export was written from fp32 copies of the trainer's weights: on GPU (bf16) the scales agree with
        # the stream's only up to the bf16 -> fp32 conversion, which is exact, so bytes must still match
        bad = [n for n in fp8 if not torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8))
               or not torch.equal(got[n[:-6] + "weight_scale"], want[n[:-6] + "weight_scale"])]
        result.update(mode="dry-run", fp8_tensors=len(fp8), mismatched=bad[:5], ok=not bad and len(fp8) == 14)
    else:
        from megatron_spark.rollout.engine import RolloutEngine, RolloutRequest

        prompts = [RolloutRequest("The capital of France is"), RolloutRequest("1 2 3 4 5")]
        greedy = dict(n=1, temperature=0.0, max_new_tokens=16)
        engine_a = RolloutEngine(str(start), dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.2)
        before = [s[0].token_ids for s in engine_a.generate(prompts, **greedy)]
        sync.push(engine_a)
        after = [s[0].token_ids for s in engine_a.generate(prompts, **greedy)]
        # the reference engine in its own process: vLLM allows one sleep-mode engine per process, and engine A's
        # memory is not reliably freed while this process lives
        ref = _greedy_elsewhere(expected, [p.prompt for p in prompts], greedy["max_new_tokens"])
        result.update(mode="vllm", synced_equals_export=after == ref, changed_by_sync=after != before,
                      ok=after == ref and after != before)
    print(json.dumps(result))
    dist.destroy_process_group()
    return 0 if result["ok"] else 1


def _greedy_elsewhere(model_dir, prompts: list, max_new_tokens: int) -> list:
    """Greedy token ids of a fresh engine loaded from `model_dir`, run in a subprocess."""
    import subprocess

    code = ("import json, sys\n"
            "from megatron_spark.rollout.engine import RolloutEngine, RolloutRequest\n"
            f"e = RolloutEngine({str(model_dir)!r}, dtype='bfloat16', max_model_len=256, gpu_memory_utilization=0.2)\n"
            f"out = e.generate([RolloutRequest(p) for p in {prompts!r}], n=1, temperature=0.0, "
            f"max_new_tokens={max_new_tokens})\n"
            "print('TOKENS ' + json.dumps([s[0].token_ids for s in out]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("TOKENS ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"reference engine failed: {p.stderr[-2000:]}")
    return json.loads(line[len("TOKENS "):])


if __name__ == "__main__":
    sys.exit(main())
