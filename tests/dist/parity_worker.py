"""torchrun worker: megatron-core Qwen2 / Qwen3 / Qwen2.5-VL vs HF transformers, several layouts in one launch.

Usage: torchrun --nproc-per-node 2 tests/dist/parity_worker.py MODELS_JSON OUT_JSON
MODELS_JSON maps a case name to an HF dir. For each layout (TP=1 (DP=2), TP=2, PP=2) and model it compares the
full-vocabulary logits and the trainer's per-token log-probs with HF on text and image+text inputs; at TP=2 it also compares gradients mapped back to
HF names. Two models also take optimizer steps through the trainer's Policy (megatron-core DDP + optimizer + pipeline
schedule) at every layout: the loss must fall, and TP-replicated parameters and their gradients must stay identical
on both TP ranks. Rank 0 writes the figures to OUT_JSON; pytest asserts on them.
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.oracle` when torchrun runs this file

from megatron_spark.config import TrainingConfig  # noqa: E402

TRAIN_CASES = ("q2_untied_gqa4", "vl_tied", "q2_3layers", "q2_4layers", "q3_untied_3layers")
# layout name -> (TP, PP, VPP, sequence parallel), and the cases each one runs (None: all of them)
LAYOUTS = {"tp1": (1, 1, None, False), "tp2": (2, 1, None, False), "pp2": (1, 2, None, False),
           "pp2vpp2": (1, 2, 2, False), "tp2sp": (2, 1, None, True)}
LAYOUT_CASES = {"tp2": lambda c: c != "q2_4layers", "pp2vpp2": lambda c: c == "q2_4layers",
                "tp2sp": lambda c: c in ("q2_untied_gqa4", "vl_tied", "vl_untied", "q3_untied_3layers")}
ONE_STEP = {}  # case -> HF tensors after the reference step (rank 0), for the layout-invariance check


def one_step_variants(tp: int, pp: int, vpp=None) -> dict:
    """(micro_batch_size, max_tokens_per_micro_batch, loss normalisation) per variant run at this layout."""
    if vpp:  # virtual stages: fixed-size micro-batches only (4 of them: two groups of PP in the interleaved schedule,
        return {"mbs2": (2, None, "global_batch"), "mbs3": (3, None, "global_batch")}  # or 3 padded to 4)
    if pp > 1:  # the token budget makes micro-batches of different shapes: the pipeline must carry them
        return {"mbs2": (2, None, "global_batch"), "tokens": (2, 64, "global_batch")}
    out = {"mbs4": (4, None, "global_batch"), "mbs2": (2, None, "global_batch"),
           "tokens": (4, 64, "global_batch")}
    if tp == 1:  # DP=2: the old per-micro-batch mean, which must NOT match (the check can fail)
        out["mbs2_micro_batch_mean"] = (2, None, "micro_batch")
    return out


def one_step(path, shape, layout, case, variant) -> dict:
    """The same 8 fixed rollouts, one optimizer step through Policy; returns the HF tensors after it (rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spark.algorithm import BatchSize
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.parity import sample_inputs
    from tests.oracle import response_rollouts
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import HFCheckpoint, export_megatron_to_hf, load_hf_into_megatron
    from megatron_spark.placement import balanced_partition
    from megatron_spark.config import AlgorithmConfig
    from megatron_spark.loss import GRPOLoss
    from megatron_spark.policy import Policy

    mbs, max_tokens, norm, *old_mode = variant
    old_mode = old_mode[0] if old_mode else "fixed"
    wmap = WeightMap(shape, tp=layout.tp)
    chunks = build_model(shape, layout, dtype=torch.float32)
    load_hf_into_megatron(chunks, wmap, HFCheckpoint(path), ps.get_tensor_model_parallel_rank(), layout.tp)
    # Adam's first step is lr * sign(grad) for eps << |grad|, which turns round-off in a near-zero gradient into a
    # full +-lr flip; a large eps makes the step proportional to the gradient, so parameters compare smoothly
    cfg = TrainingConfig(lr=1e-3, min_lr_ratio=1.0, warmup_ratio=0.0, weight_decay=0.0, adam_beta1=0.9,
                         adam_beta2=0.95, adam_eps=1.0, clip_grad=1e9, use_distributed_optimizer=False,
                         max_tokens_per_micro_batch=max_tokens, micro_batch_size=mbs)
    policy = Policy.for_training(chunks, shape, dtype=torch.float32, pad_id=0, training=cfg, total_steps=10)
    inputs = sample_inputs(path, shape)
    rollouts = [r for n in (3, 5, 7, 4, 6, 8, 2, 9) for r in response_rollouts(inputs, n)][:8]
    for r in rollouts:  # odd total lengths (23 for text): sequence parallelism must pad what TP does not divide
        r.prompt_ids = r.prompt_ids[1:]
    for r, a in zip(rollouts, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3]):
        r.advantage = a
    # old log-probs fixed from the unmodified weights (so every layout optimises exactly the same objective)
    for r in rollouts:
        r.old_logprobs = -0.5 - 0.01 * torch.arange(len(r.response_ids), dtype=torch.float32)
        r.ref_logprobs = r.old_logprobs - 0.1
    alg = AlgorithmConfig(kl_coef=0.05, eps_clip_low=0.2, eps_clip_high=0.28)
    size = BatchSize(tokens=sum(len(r.response_ids) for r in rollouts), sequences=len(rollouts))
    part = balanced_partition([len(r.prompt_ids) + len(r.response_ids) for r in rollouts], layout.dp)
    mine = [rollouts[i] for i in part[layout.coords(dist.get_rank())["dp"]]]
    # micro-batches whose longest sequence TP does not divide (sequence parallelism must pad them)
    uneven = sum(max(len(r.prompt_ids) + len(r.response_ids) for r in mb) % layout.tp != 0
                 for mb in policy._micro_batches(mine))
    if old_mode == "pass":  # pi_old from a forward pass at the current weights (what the trainer did always)
        for r, lp in zip(mine, policy.token_logprobs(mine)):
            r.old_logprobs = lp
    elif old_mode == "current":  # no pass: the update's own forward stands in (the period's first step)
        for r in mine:
            r.old_logprobs, r.old_is_current = None, True
    if norm == "global_batch":
        policy.train_step(mine, GRPOLoss(alg, size))
    else:
        policy.train_step(mine, GRPOLoss(alg))
    group = ps.get_tensor_model_parallel_group()
    out = {("meta", "uneven_lengths"): uneven}
    for kind, grads in (("param", False), ("grad", True)):  # grads: what the optimizer got, after DP averaging
        local = export_megatron_to_hf(policy.modules, wmap, group, grads=grads)
        stages = [None] * dist.get_world_size()
        # (host copies: a pickled CUDA tensor unpickles onto the sender's device on every receiver)
        dist.all_gather_object(stages, {k: v.detach().cpu().clone() for k, v in local.items()})
        for st in stages:
            out.update({(kind, k): v for k, v in st.items()})
    return out


def compare_to_reference(case, merged, path) -> dict:
    from megatron_spark.models.weights import HFCheckpoint

    ref = ONE_STEP[case]
    init = HFCheckpoint(path)
    params = [k for k in ref if k[0] == "param"]
    grads = [k for k in ref if k[0] == "grad"]
    return {"max_abs_diff": max((merged[k] - ref[k]).abs().max().item() for k in params),
            "max_update": max((ref[k] - init.get(k[1]).float()).abs().max().item() for k in params),
            "grad_max_rel_diff": max((merged[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-12)
                                     for k in grads),
            "tensors": len(params), "missing": sorted(k for _, k in set(ref) - set(merged)),
            "worst": max(params, key=lambda k: (merged[k] - ref[k]).abs().max().item())[1]}


def live_static_bytes(policy) -> dict:
    """What this rank's trainer holds after optimizer steps, counted from the live objects: parameters, DDP gradient
    buffers and Adam's moment tensors; with its pipeline stage and coordinates (for the planner comparison)."""
    from megatron.core import parallel_state as ps

    params = [p for m in policy.modules for p in m.parameters()]
    grads = [b.grad_data for c in policy.chunks for b in list(c.buffers) + list(c.expert_parallel_buffers)]
    opt = policy.optimizer
    states = [st for o in getattr(opt, "chained_optimizers", [opt]) for st in o.optimizer.state.values()]
    moments = [t for st in states for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"stage": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "param_elements": sum(p.numel() for p in params), "params": size(params), "grads": size(grads),
            "optimizer": size(moments), "rank": torch.distributed.get_rank()}


def train_check(chunks, shape, inputs) -> dict:
    """Optimizer steps through Policy on fixed sequences: SFT steps must lower the NLL; GRPO steps (no KL) must raise
    the log-probs of positive-advantage samples and lower those of negative ones; replicated parameters (norms,
    biases of row-parallel layers, the vision patch embedding...) and their gradients equal on every TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tests.oracle import response_rollouts
    from megatron_spark.config import AlgorithmConfig
    from megatron_spark.loss import GRPOLoss, SFTLoss
    from megatron_spark.policy import Policy

    cfg = TrainingConfig(lr=2e-3, min_lr_ratio=1.0, warmup_ratio=0.0, weight_decay=0.0, adam_beta1=0.9,
                         adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=False,
                         max_tokens_per_micro_batch=None, micro_batch_size=2)
    policy = Policy.for_training(chunks, shape, dtype=torch.float32, pad_id=0, training=cfg, total_steps=100)
    # GRPO first (a fresh model): the sampled responses pushed up, the same responses reversed pushed down
    rollouts = []
    for r in [r for n in (6, 4) for r in response_rollouts(inputs, n)][:2]:
        rollouts.append(r)
        rollouts.append(replace(r, response_ids=r.response_ids[::-1], group=r.group + "-reversed"))
    for i, r in enumerate(rollouts):
        r.advantage = 1.0 if i % 2 == 0 else -1.0
    before = policy.token_logprobs(rollouts)
    for r, lp in zip(rollouts, before):
        r.old_logprobs = lp
    alg = AlgorithmConfig(kl_coef=0.0)
    grpo = [policy.train_step(rollouts, GRPOLoss(alg)) for _ in range(3)]
    after = policy.token_logprobs(rollouts)
    moved = [(a.mean() - b.mean()).item() * r.advantage for r, a, b in zip(rollouts, after, before)]
    # then supervised steps on the sampled responses: the NLL must fall
    sft = [policy.train_step(rollouts[::2] * 2, SFTLoss())["sft_loss"] for _ in range(6)]
    # replicated tensors: the same on both TP ranks, bit for bit
    worst_p, worst_g, n_rep, differing = 0.0, 0.0, 0, {}
    group = ps.get_tensor_model_parallel_group()
    if ps.get_tensor_model_parallel_world_size() > 1:
        for c in policy.chunks:
            for name, p in c.module.named_parameters():
                if getattr(p, "tensor_model_parallel", False):
                    continue
                n_rep += 1
                for t, kind in ((p.data, "p"), (p.main_grad, "g")):
                    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                    dist.all_gather(parts, t.contiguous(), group=group)
                    d = max((x - parts[0]).abs().max().item() for x in parts)
                    if d > 0:
                        differing[f"{kind}:{name}"] = d
                    if kind == "p":
                        worst_p = max(worst_p, d)
                    else:
                        worst_g = max(worst_g, d)
    # tied embeddings under PP: the first stage's embedding and the last stage's output-layer copy stay equal
    tied_diff = None
    if shape.text.tied_embeddings and ps.get_pipeline_model_parallel_world_size() > 1:
        # (with virtual stages the chunk holding it is the first or the last, not necessarily modules[0])
        w = next(w for m in policy.modules if (w := m.shared_embedding_or_output_weight()) is not None).data
        parts = [torch.empty_like(w) for _ in range(dist.get_world_size(ps.get_embedding_group()))]
        dist.all_gather(parts, w.contiguous(), group=ps.get_embedding_group())
        tied_diff = max((x - parts[0]).abs().max().item() for x in parts)
    return {"static": live_static_bytes(policy), "tied_copies_max_diff": tied_diff, "sft_losses": sft, "grpo_grad_norms": [m["grad_norm"] for m in grpo], "logprob_moves": moved,
            "replicated_params": n_rep, "replicated_param_max_diff": worst_p, "replicated_grad_max_diff": worst_g,
            "replicated_differing": differing,
            "optimizer_steps": policy.optimizer_steps}


def main():
    models = json.loads(open(sys.argv[1]).read())
    out_path = sys.argv[2]
    from megatron.core import parallel_state as ps

    from megatron_spark.mapping.table import WeightMap, canonical_hf_name
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.models.parity import compare_logits, hf_reference, sample_inputs, to_batch
    from tests.oracle import compare_token_logprobs
    from megatron_spark.models.runtime import forward_backward
    from megatron_spark.models.weights import HFCheckpoint, export_megatron_to_hf, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.policy import Policy

    results = {}
    import torch.distributed as dist

    for layout_name, (tp, pp, vpp, sp) in LAYOUTS.items():
        layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp, world_size=2)
        layout.initialize(seed=1234)
        for case, path in models.items():
            if not LAYOUT_CASES.get(layout_name, lambda c: True)(case):
                continue
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

                    def ce(logits):  # (the labels go where the logits are: the GPU for Megatron, the CPU for HF)
                        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 labels.to(logits.device).reshape(-1))
                    for c in chunks:
                        c.zero_grad(set_to_none=True)
                    forward_backward(chunks, batch, shape.text.vocab_size, loss_fn=ce)
                    if shape.text.qk_norm:  # each TP rank's heads give part of the q/k norms' gradient: summed
                        for c in chunks:  # over TP, as megatron-core's finalize_model_grads does in training
                            for n, prm in c.named_parameters():
                                if ("q_layernorm" in n or "k_layernorm" in n) and prm.grad is not None:
                                    dist.all_reduce(prm.grad, group=ps.get_tensor_model_parallel_group())
                    mg_grads = {n: g.detach().cpu() for n, g in export_megatron_to_hf(
                        chunks, wmap, ps.get_tensor_model_parallel_group(), grads=True).items()}
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
            if case in TRAIN_CASES:  # last: wraps the chunks in DDP and changes their weights
                results[f"train/{layout_name}/{case}"] = train_check(chunks, shape, inputs)
                results[f"static/{layout_name}/{case}/rank{dist.get_rank()}"] = \
                    results[f"train/{layout_name}/{case}"].pop("static")
                del chunks
                if layout_name in ("tp1", "pp2") and case == "q2_untied_gqa4":
                    # pi_old without its forward pass: the same update as with it, within fp32 round-off
                    with_pass = one_step(path, shape, layout, case, (2, None, "global_batch", "pass"))
                    without = one_step(path, shape, layout, case, (2, None, "global_batch", "current"))
                    ks = [k for k in with_pass if k[0] == "param"]
                    results[f"old_current/{layout_name}/{case}"] = {
                        "max_abs_diff": max((with_pass[k] - without[k]).abs().max().item() for k in ks),
                        "max_update": max((with_pass[k] - HFCheckpoint(path).get(k[1]).float()).abs().max().item()
                                          for k in ks), "tensors": len(ks)}
                for vname, variant in one_step_variants(tp, pp, vpp).items():
                    merged = one_step(path, shape, layout, case, variant)
                    if case not in ONE_STEP:  # the first layout's first variant is the reference: TP1 DP2 mbs 4
                        ONE_STEP[case] = merged
                    results[f"one_step/{layout_name}/{vname}/{case}"] = dict(
                        compare_to_reference(case, merged, path), uneven_lengths=merged[("meta", "uneven_lengths")])
                chunks = None
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
