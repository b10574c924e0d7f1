"""torchrun worker: megatron-core Qwen2 / Qwen2.5-VL vs HF transformers, several layouts in one launch.

Usage: torchrun --nproc-per-node 2 tests/dist/parity_worker.py MODELS_JSON OUT_JSON
MODELS_JSON maps a case name to an HF dir. For each layout (TP=1 (DP=2), TP=2, PP=2) and model it compares the
full-vocabulary logits and the trainer's per-token log-probs with HF on text and image+text inputs; at TP=2 it also compares gradients mapped back to
HF names. Rank 0 writes the figures to OUT_JSON; pytest asserts on them.
"""
import json
import sys
import time

import torch


def main():
    models = json.loads(open(sys.argv[1]).read())
    out_path = sys.argv[2]
    from megatron.core import parallel_state as ps

    from megatron_spark.mapping.qwen import WeightMap, canonical_hf_name
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.qwen import build_model
    from megatron_spark.models.parity import (compare_logits, compare_token_logprobs, hf_reference, sample_inputs,
                                              to_batch)
    from megatron_spark.models.runtime import forward_backward
    from megatron_spark.models.weights import HFCheckpoint, export_megatron_to_hf, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.policy import Policy

    results = {}
    import torch.distributed as dist

    for layout_name, (tp, pp) in {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}.items():
        layout = ParallelLayout(tp=tp, pp=pp, world_size=2)
        layout.initialize(seed=1234)
        for case, path in models.items():
            t0 = time.time()
            shape = load_hf_config(path)
            wmap = WeightMap(shape, tp=tp)
            chunks = build_model(shape, layout, dtype=torch.float32)
            load_hf_into_megatron(chunks, wmap, HFCheckpoint(path), ps.get_tensor_model_parallel_rank(), tp)
            ref = hf_reference(path, shape.family)
            inputs = sample_inputs(path, shape)
            for inp_name, r in compare_logits(chunks, shape, ref, inputs).items():
                results[f"{layout_name}/{case}/{inp_name}"] = r
            # the trainer's log-probs (vocab-parallel, padded vocabulary masked) against HF's log-softmax
            policy = Policy(chunks, shape, pad_id=0, micro_batch_size=1)
            results[f"logprob/{layout_name}/{case}"] = compare_token_logprobs(policy, ref, inputs)
            if layout_name == "tp2":  # gradients through megatron-core autograd vs HF autograd
                for inp_name, kw in inputs[-1:]:
                    labels = torch.roll(kw["input_ids"], -1, dims=1)
                    batch = to_batch(shape, kw)

                    def ce(logits):
                        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 labels.reshape(-1))
                    for c in chunks:
                        c.zero_grad(set_to_none=True)
                    forward_backward(chunks, batch, shape.text.vocab_size, loss_fn=ce)
                    mg_grads = export_megatron_to_hf(chunks, wmap, ps.get_tensor_model_parallel_group(), grads=True)
                    ref.zero_grad(set_to_none=True)
                    ce(ref(**kw).logits.float()).backward()
                    hf_grads = {canonical_hf_name(n): p.grad for n, p in ref.named_parameters()
                                if p.grad is not None}
                    if wmap.tied and "lm_head.weight" in hf_grads:
                        hf_grads.pop("lm_head.weight")
                    worst, worst_name, rel_worst = 0.0, "", 0.0
                    missing = sorted(set(hf_grads) - set(mg_grads))
                    for n, g in mg_grads.items():
                        d = (g - hf_grads[n]).abs().max().item()
                        rel = d / max(hf_grads[n].abs().max().item(), 1e-12)
                        if rel > rel_worst:
                            worst, worst_name, rel_worst = d, n, rel
                    results[f"grad/{case}/{inp_name}"] = {"max_abs_diff": worst, "max_rel_diff": rel_worst,
                                                          "worst": worst_name, "n_params": len(mg_grads),
                                                          "missing": missing}
            if dist.get_rank() == 0:
                print(f"[{layout_name}] {case}: {time.time() - t0:.1f}s", flush=True)
            del chunks
        ps.destroy_model_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {}
        for r in gathered:
            merged.update(r)
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
