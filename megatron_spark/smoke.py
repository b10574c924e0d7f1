"""`make run` until the trainer lands: build a tiny Qwen2.5-VL, run it on megatron-core at TP=2 (gloo), compare
with HF transformers, and take one real optimizer step. Launched under torchrun by `megatron-spark demo`."""
from __future__ import annotations

import sys
import time

import torch


def main(hf_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spark.mapping.qwen import WeightMap
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.parity import compare_logits, hf_reference, sample_inputs, to_batch
    from megatron_spark.models.qwen import build_model
    from megatron_spark.models.runtime import forward_backward
    from megatron_spark.models.weights import HFCheckpoint, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout

    layout = ParallelLayout(tp=2, pp=1, world_size=int(dist.get_world_size()) if dist.is_initialized() else 2)
    layout.initialize(seed=1234)
    shape = load_hf_config(hf_dir)
    chunks = build_model(shape, layout, dtype=torch.float32)
    load_hf_into_megatron(chunks, WeightMap(shape, tp=layout.tp), HFCheckpoint(hf_dir),
                          ps.get_tensor_model_parallel_rank(), layout.tp)
    inputs = sample_inputs(hf_dir, shape)
    res = compare_logits(chunks, shape, hf_reference(hf_dir, shape.family), inputs)
    # One optimizer step on the image prompt: the loss must go down when the step is repeated.
    opt = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=1e-3)
    name, kw = inputs[-1]
    labels = torch.roll(kw["input_ids"], -1, dims=1)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(float(forward_backward(chunks, to_batch(shape, kw), shape.text.vocab_size, loss_fn=ce)))
        opt.step()
    if dist.get_rank() == 0:
        print(f"\nQwen2.5-VL (tiny) on megatron-core, TP={layout.tp} gloo, vs HF transformers (fp32)")
        print(f"{'input':<8} {'tokens':>6} {'max|dlogit|':>12} {'argmax':>7}")
        for k, r in res.items():
            print(f"{k:<8} {r['tokens']:>6} {r['max_abs_diff']:>12.2e} {'same' if r['argmax_equal'] else 'DIFF':>7}")
        print(f"3 AdamW steps on '{name}': loss {' -> '.join(f'{x:.3f}' for x in losses)}")
        ok = all(r["max_abs_diff"] <= 1e-4 and r["argmax_equal"] for r in res.values()) and losses[-1] < losses[0]
        print("smoke run:", "OK" if ok else "FAILED")
        if not ok:
            sys.exit(1)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
