"""The resharding planner on real Qwen2.5-VL-32B shapes, every rank simulated in one process (no tensors)."""
import math
from collections import defaultdict

import pytest

from megatron_spark.bridge.planner import plan, vllm_shard_rows
from megatron_spark.mapping.table import WeightMap, expected_hf_shapes as hf_shapes
from megatron_spark.models.hf_config import parse_hf_config

QWEN25_VL_32B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655,
    "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
    "num_key_value_heads": 8, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16,
                      "out_hidden_size": 5120, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
}


def stage_of(num_layers, pp):
    def f(name):
        if "decoder.layers." in name and not name.startswith("vision_model"):
            return int(name.split("layers.")[1].split(".")[0]) // (num_layers // pp)
        if "vision_model" in name or "embedding" in name:
            return 0
        return pp - 1
    return f


@pytest.mark.parametrize("train_tp,train_pp,rollout_tp,kv_heads", [
    (8, 2, 4, 8), (4, 4, 8, 8), (2, 1, 1, 8), (2, 1, 4, 8),
    (4, 2, 8, 4),   # rollout TP > KV heads: vLLM replicates each KV head on two ranks
    (2, 2, 4, -1),  # tied embeddings (the output layer is not sent twice)
])
def test_every_target_element_covered_exactly_once(train_tp, train_pp, rollout_tp, kv_heads):
    cfg = {**QWEN25_VL_32B, "num_key_value_heads": abs(kv_heads) if kv_heads > 0 else 8}
    if kv_heads < 0:
        cfg["tie_word_embeddings"] = True
    check_plan(parse_hf_config(cfg), train_tp, train_pp, rollout_tp)


@pytest.mark.parametrize("train_tp,train_pp,rollout_tp", [(8, 2, 4), (4, 4, 8), (2, 2, 16)])
def test_qwen3_32b_target_elements_covered_exactly_once(train_tp, train_pp, rollout_tp):
    """Qwen3: per-head q/k norms (replicated, sent whole to every rollout rank), no qkv bias; at rollout TP 16 each
    of its 8 KV heads is replicated on two ranks."""
    from megatron_spark.planner.model import load_model

    shape = load_model("qwen3-32b")
    names = WeightMap(shape, tp=train_tp).hf_names()
    assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.self_attn.q_proj.bias" not in names
    check_plan(shape, train_tp, train_pp, rollout_tp)


def check_plan(shape, train_tp: int, train_pp: int, rollout_tp: int) -> None:
    wmap = WeightMap(shape, tp=train_tp)
    shapes = hf_shapes(shape)
    assert set(wmap.hf_names()) == set(shapes)
    transfers = plan(wmap, shapes, train_tp, train_pp, stage_of(64, train_pp), rollout_tp)
    covered = defaultdict(list)
    for tr in transfers:
        covered[(tr.param, tr.dst_name, tr.dst_tp)].append((tr.dst_offset, tr.length))
        # the source slice lies inside the sender's own shard: nobody materialises a full tensor
        pm = wmap[tr.param]
        dim = tr.dim
        rows = [shapes[n][dim] for n in pm.hf]
        local = sum(r.length for r in pm.transform.shard_runs(pm.hf, rows, tr.src_tp, train_tp))
        assert 0 <= tr.src_offset and tr.src_offset + tr.length <= local
        assert tr.src_pp == stage_of(64, train_pp)(tr.param)
    want = vllm_shard_rows(wmap, shapes, rollout_tp)
    assert set(covered) == set(want)
    for key, runs in covered.items():
        runs.sort()
        filled = sum(n for _, n in runs)
        assert filled == want[key][0], key
        for (a, n), (b, _) in zip(runs, runs[1:]):
            assert a + n <= b, ("overlap", key)
    # bytes: exactly the elements of the target shards (each element crosses once per engine)
    moved = sum(tr.numel for tr in transfers)
    target = 0
    for (mg, _, _), (rows, _) in want.items():
        pm = wmap[mg]
        s = shapes[pm.hf[0]]
        dim = 1 if pm.transform.tp_dim == 1 else 0
        target += rows * (math.prod(s) // s[dim])
    assert moved == target


def test_model_bytes_once_when_no_kv_replication():
    """TP_rollout = 1: one copy of everything crosses, so the bytes moved equal the model's size."""
    shape = parse_hf_config(QWEN25_VL_32B)
    wmap = WeightMap(shape, tp=8)
    shapes = hf_shapes(shape)
    transfers = plan(wmap, shapes, 8, 2, stage_of(64, 2), 1)
    replicated = sum(math.prod(shapes[pm.hf[0]]) for pm in wmap.export_params() if pm.transform.tp_dim is None)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(tr.numel for tr in transfers) == total  # TP_rollout=1: one copy of everything
    assert replicated < total


def test_vllm_vocab_shards_follow_vllm_padding():
    """vLLM pads the vocabulary to a multiple of 64 and then splits it evenly: 600 -> 640 = 4 x 160."""
    shape = parse_hf_config({**QWEN25_VL_32B, "vocab_size": 600, "num_hidden_layers": 2})
    rows = vllm_shard_rows(WeightMap(shape, tp=2), hf_shapes(shape), 4)
    emb = {dst: v for (_, name, dst), v in rows.items() if name.endswith("embed_tokens.weight")}
    assert emb == {0: (160, 0), 1: (160, 0), 2: (160, 0), 3: (120, 40)}
    with pytest.raises(ValueError, match="cannot shard a vocabulary of 600"):
        vllm_shard_rows(WeightMap(shape, tp=2), hf_shapes(shape), 3)


def test_inplace_targets_must_match_the_plan():
    """An engine whose weights differ from the plan (another vLLM layout) is refused before any byte moves."""
    import torch

    from megatron_spark.bridge.planner import vllm_shard_shapes
    from megatron_spark.bridge.sync import bind_engine_targets

    shape = parse_hf_config({**QWEN25_VL_32B, "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
                             "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 600,
                             "vision_config": {**QWEN25_VL_32B["vision_config"], "depth": 1, "hidden_size": 64,
                                               "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
                                               "fullatt_block_indexes": [0]}})
    wmap, shapes = WeightMap(shape, tp=2), hf_shapes(shape)
    engine = {n: torch.empty(s, device="meta") for n, (s, _) in vllm_shard_shapes(wmap, shapes, 2, 0).items()}
    assert len(bind_engine_targets(wmap, shapes, 2, 0, engine, lambda n: n, torch.float32)) == len(engine)
    qkv = next(n for n in engine if n.endswith("layers.0.self_attn.qkv_proj.weight"))
    wrong = {**engine, qkv: torch.empty(engine[qkv].shape[0] * 2, engine[qkv].shape[1], device="meta")}
    with pytest.raises(ValueError, match=r"(?s)qkv_proj.weight: the engine holds .* the plan expects .*hf_full"):
        bind_engine_targets(wmap, shapes, 2, 0, wrong, lambda n: n, torch.float32)
    with pytest.raises(ValueError, match="no parameter 'renamed."):
        bind_engine_targets(wmap, shapes, 2, 0, engine, lambda n: "renamed." + n, torch.float32)
