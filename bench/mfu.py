#!/usr/bin/env python
"""Trainer throughput and model-FLOPs utilisation of the Megatron side of an RL step, on one GPU.

    python bench/mfu.py --model 7b --layers 8 --seq 2048 --micro-batches 4

Builds the real model shapes (Qwen2.5-7B or -32B text stack, fewer layers so that it fits one GPU; the full
vocabulary and its output layer stay), wraps them exactly as the trainer does (`Policy.for_training`: megatron-core
DDP, distributed optimizer, LR schedule), then times the two passes of an RL step on random token sequences:
the log-prob pass (forward only, what old/reference log-probs cost) and the GRPO update (forward + backward +
optimizer step). FLOPs are the model FLOPs of Megatron-LM's accounting: 2 per multiply-add of every matmul
(QKV, output, MLP, output layer) plus attention's two s x s products counted in full, x3 for forward + backward.
MFU is against the chip's dense bf16 peak (989 TFLOP/s for H100/H200 SXM). On CPU it runs as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # Qwen2.5 text stacks (the VL-7B/32B language models have the same shapes)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8,
                vocab_size=152064),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def flops_per_token(c: dict, layers: int, seq: int) -> float:
    """Forward model FLOPs per token (attention's s^2 products counted in full, as Megatron-LM does)."""
    d, f, h, g = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = d // h
    per_layer = 2 * (d * h * hd + 2 * d * g * hd + h * hd * d + 3 * d * f) + 2 * 2 * seq * h * hd
    return layers * per_layer + 2 * d * c["vocab_size"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048, help="prompt + response tokens per sequence")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed updates after one warm-up")
    ap.add_argument("--recompute", action="store_true", help="full activation recompute")
    a = ap.parse_args()
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"), RANK="0",
                     WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    import torch

    from megatron_spark import compat
    from megatron_spark.config import AlgorithmConfig, TrainingConfig
    from megatron_spark.models.hf_config import parse_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.loss import GRPOLoss
    from megatron_spark.policy import Policy, Rollout

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    c = dict(SHAPES[a.model], num_hidden_layers=a.layers, architectures=["Qwen2ForCausalLM"],
             tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6)
    shape = parse_hf_config(c)
    layout = ParallelLayout(world_size=1)
    layout.initialize()
    t0 = time.perf_counter()
    chunks = build_model(shape, layout, dtype=dtype, recompute=a.recompute)
    params = sum(p.numel() for ch in chunks for p in ch.parameters())
    policy = Policy.for_training(chunks, shape, dtype=dtype, pad_id=0, total_steps=100,
                                 training=TrainingConfig(lr=1e-6, warmup_ratio=0.0,
                                                         micro_batch_size=a.micro_batch_size))
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    n = a.micro_batch_size * a.micro_batches
    prompt = a.seq // 4
    rollouts = [Rollout(prompt_ids=torch.randint(100, c["vocab_size"], (prompt,), generator=g).tolist(),
                        response_ids=torch.randint(100, c["vocab_size"], (a.seq - prompt,), generator=g).tolist(),
                        group=str(i // 2), advantage=1.0 if i % 2 else -1.0) for i in range(n)]
    loss = GRPOLoss(AlgorithmConfig(kl_coef=0.0))

    def timed(fn):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if on_gpu:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    for r, lp in zip(rollouts, policy.token_logprobs(rollouts)):  # warm-up + the old log-probs
        r.old_logprobs = lp
    policy.train_step(rollouts, loss)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    fwd_s = min(timed(lambda: policy.token_logprobs(rollouts))[1] for _ in range(a.steps))
    step_s = sorted(timed(lambda: policy.train_step(rollouts, loss))[1] for _ in range(a.steps))[a.steps // 2]
    tokens = n * a.seq
    fpt = flops_per_token(c, a.layers, a.seq)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    res = {"device": name, "model": a.model, "layers": a.layers, "params": params, "seq": a.seq,
           "micro_batch_size": a.micro_batch_size, "micro_batches": a.micro_batches, "recompute": a.recompute,
           "transformer_engine": compat.have_transformer_engine(),  # build_model's default spec
           "build_s": round(build_s, 1), "logprob_pass_s": round(fwd_s, 3), "update_s": round(step_s, 3),
           "update_tokens_per_s": round(tokens / step_s), "logprob_tokens_per_s": round(tokens / fwd_s),
           "update_tflops": round(3 * fpt * tokens / step_s / 1e12, 1),
           "logprob_tflops": round(fpt * tokens / fwd_s / 1e12, 1)}
    if peak:
        res["update_mfu"] = round(3 * fpt * tokens / step_s / peak, 3)
        res["logprob_mfu"] = round(fpt * tokens / fwd_s / peak, 3)
    if on_gpu:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
    print(json.dumps(res))
    return 0

if __name__ == "__main__":
    sys.exit(main())
