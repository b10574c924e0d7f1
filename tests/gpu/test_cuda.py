"""GPU tier (skipped without CUDA; CI never has one): the model and the trainer's Megatron side on a real GPU.

One process, world size 1 (NCCL). HF transformers on the same GPU is the oracle: logits for the local and the
Transformer Engine layer specs, per-token log-probs of the policy, and an optimizer step through megatron-core's
distributed optimizer.
"""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def world():
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    from megatron.core import parallel_state as ps

    from megatron_spark.parallel import ParallelLayout

    # fp32 oracle: no TF32 anywhere (cuDNN allows it by default, and HF's patch embedding is a Conv3d)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    layout = ParallelLayout(world_size=1)
    layout.initialize()
    yield layout
    ps.destroy_model_parallel()


@pytest.mark.parametrize("spec", ["local", "te"])
def test_cuda_logits_match_hf(tiny_models, world, spec):
    from megatron_spark import compat
    from megatron_spark.mapping.table import WeightMap
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.parity import compare_logits, hf_reference, sample_inputs
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import HFCheckpoint, load_hf_into_megatron

    if spec == "te" and not compat.have_transformer_engine():
        pytest.skip("Transformer Engine is not installed")
    for name in ("q2_tied", "vl_untied"):
        path = tiny_models[name]
        shape = load_hf_config(path)
        chunks = build_model(shape, world, dtype=torch.float32, use_te=spec == "te")
        chunks = [c.cuda() for c in chunks]
        load_hf_into_megatron(chunks, WeightMap(shape), HFCheckpoint(path), 0, 1)
        inputs = [(n, {k: v.cuda() for k, v in kw.items()}) for n, kw in sample_inputs(path, shape)]
        res = compare_logits(chunks, shape, hf_reference(path, shape.family).cuda(), inputs)
        for k, r in res.items():
            assert r["max_abs_diff"] < 1e-3 and r["argmax_equal"], (name, spec, k, r)


@pytest.mark.parametrize("name", ["q2_untied_gqa4", "vl_untied"])
def test_policy_logprobs_and_update_on_cuda(tiny_models, world, name):
    """Host-built batches reach the GPU; log-probs match HF; the distributed optimizer lowers the NLL."""
    from megatron_spark.config import ModelConfig, TrainingConfig
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.parity import hf_reference, sample_inputs
    from tests.oracle import compare_token_logprobs, response_rollouts
    from megatron_spark.loss import SFTLoss
    from megatron_spark.policy import Policy

    path = tiny_models[name]
    shape = load_hf_config(path)
    cfg = TrainingConfig(lr=1e-3, warmup_ratio=0.0, use_distributed_optimizer=True, micro_batch_size=2)
    policy = Policy.build(shape, world, ModelConfig(hf_dir=path, dtype="fp32"), cfg, pad_id=0, total_steps=10)
    inputs = sample_inputs(path, shape)
    diffs = compare_token_logprobs(policy, hf_reference(path, shape.family).cuda(), inputs)
    assert max(diffs.values()) < 1e-3, (name, diffs)
    rollouts = response_rollouts(inputs)
    first = policy.train_step(rollouts, SFTLoss())
    for _ in range(4):
        last = policy.train_step(rollouts, SFTLoss())
    assert first["update_ok"] and last["update_ok"]
    assert last["sft_loss"] < first["sft_loss"], (first, last)


def test_fp8_quantizer_gives_the_same_bytes_on_cuda_as_on_cpu():
    """The bridge quantizes on the device the weights live on: bf16 and fp32 weights on CUDA give the CPU's bytes
    and scales (which tests/unit/test_quant.py checks against modelopt)."""
    from megatron_spark.quant.fp8 import quantize_fp8

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(512, 256, generator=g) * 0.02).to(dtype)
        w[7] = 0
        for per_channel in (True, False):
            qc, sc = quantize_fp8(w, per_channel)
            qg, sg = quantize_fp8(w.cuda(), per_channel)
            assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and torch.equal(sc, sg.cpu())
