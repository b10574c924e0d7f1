"""Check a megatron checkpoint against its HF model: load both, run text and image+text inputs, compare logits.

The Megatron model is built at each requested TP x PP and loads the checkpoint through dist-checkpointing (so
this also proves the checkpoint reshards); HF transformers is the oracle. Both run in fp32 from the same stored
values, so any difference beyond float rounding is a conversion bug, not precision.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist


def layouts_world(layouts: list[tuple[int, int]]) -> int:
    return math.lcm(*(tp * pp for tp, pp in layouts))


def check_inputs(hf_dir: str, ckpt: str, layouts: list[tuple[int, int]], iteration: Optional[int] = None):
    """(model shape, iteration dir, padded vocab); a ValueError naming the argument for anything unusable."""
    from megatron_spark.convert.converters import check_layout_args
    from megatron_spark.io.checkpoint_layout import resolve_checkpoint
    from megatron_spark.convert.dist_io import DistCheckpointReader
    from megatron_spark.models.hf_config import load_hf_config

    shape = load_hf_config(hf_dir)
    _, it = resolve_checkpoint(ckpt, "--ckpt", iteration)
    prefix = shape.kind.megatron_prefix
    padded = DistCheckpointReader(it).shape(prefix + "embedding.word_embeddings.weight")[0]
    for tp, pp in layouts:
        check_layout_args(shape, tp, pp)
        if padded % tp:
            raise ValueError(f"--tp {tp} does not divide the checkpoint's padded vocabulary ({padded}); convert "
                             f"with --tp {tp} to pad for it")
    return shape, it, padded


def verify_checkpoint(hf_dir: str, ckpt: str, layouts: list[tuple[int, int]],
                      iteration: Optional[int] = None) -> dict[str, dict]:
    """{"tp{T}_pp{P}": {input name: figures}} (complete on rank 0). Call on every rank of the torchrun job."""
    import os

    from megatron.core import parallel_state as ps

    from megatron_spark.io.checkpoint_layout import load_model_weights
    from megatron_spark.models.parity import compare_logits, hf_logits, hf_reference, sample_inputs
    from megatron_spark.models.build import build_model
    from megatron_spark.parallel import ParallelLayout

    shape, it, padded = check_inputs(hf_dir, ckpt, layouts, iteration)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    inputs = sample_inputs(hf_dir, shape)
    ref = hf_reference(hf_dir, shape.family)
    reference = hf_logits(ref, inputs)
    del ref
    results: dict[str, dict] = {}
    for tp, pp in layouts:
        layout = ParallelLayout(tp=tp, pp=pp, world_size=world)
        layout.initialize(seed=1)
        t0 = time.time()
        chunks = build_model(shape, layout, dtype=torch.float32, make_vocab_size_divisible_by=padded)
        load_model_weights(chunks, it)
        load_s = time.time() - t0
        mine = compare_logits(chunks, shape, None, inputs, reference)
        for r in mine.values():
            r["load_s"] = load_s
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        results[f"tp{tp}_pp{pp}"] = {k: v for p in parts for k, v in p.items()}
        del chunks
        ps.destroy_model_parallel()
    return results


def format_report(results: dict[str, dict], atol: float) -> tuple[str, bool]:
    lines = [f"{'layout':<10} {'input':<8} {'tokens':>6} {'max|dlogit|':>12} {'argmax':>11} {'load s':>7}  result"]
    ok = True
    for lay, per_input in results.items():
        for name, r in per_input.items():
            good = r["max_abs_diff"] <= atol
            ok &= good
            lines.append(f"{lay:<10} {name:<8} {r['tokens']:>6} {r['max_abs_diff']:>12.2e} "
                         f"{r['argmax_agree']:>5}/{r['tokens']:<5} {r['load_s']:>7.2f}  {'ok' if good else 'FAIL'}")
    return "\n".join(lines), ok
