"""GPU tier: the Transformer Engine layer spec against HF (skipped without CUDA; CI never has one)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_te_spec_logits_match_hf(tiny_models):
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from megatron.core import parallel_state as ps

    from megatron_spark.mapping.qwen import WeightMap
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.parity import compare_logits, hf_reference, sample_inputs
    from megatron_spark.models.qwen import build_model
    from megatron_spark.models.weights import HFCheckpoint, load_hf_into_megatron
    from megatron_spark.parallel import ParallelLayout

    ParallelLayout(world_size=1).initialize()
    for name in ("q2_tied", "vl_untied"):
        path = tiny_models[name]
        shape = load_hf_config(path)
        chunks = [c.cuda() for c in build_model(shape, ParallelLayout(world_size=1), dtype=torch.float32,
                                                use_te=True)]
        load_hf_into_megatron(chunks, WeightMap(shape), HFCheckpoint(path), 0, 1)
        inputs = [(n, {k: v.cuda() for k, v in kw.items()}) for n, kw in sample_inputs(path, shape)]
        res = compare_logits(chunks, shape, hf_reference(path, shape.family).cuda(), inputs)
        for k, r in res.items():
            assert r["max_abs_diff"] < 1e-3 and r["argmax_equal"], (name, k, r)
    ps.destroy_model_parallel()
