"""The resharding plan executed on real tensors, checked against vLLM's own sharding (its layers' weight loaders).

Qwen2.5-32B's text shapes shrunk in width (40 query heads over 8 or 4 KV heads, head_dim 8, an odd vocabulary that
vLLM pads), every rank simulated in one process: the Megatron shards are built the way the trainer's loader defines
them (`Transform.to_megatron` then `shard`, the path the HF-logit parity tests check), the plan's transfers are copied
slice by slice into zeroed vLLM-shaped buffers, and each buffer must equal what vLLM's QKVParallelLinear,
MergedColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding make of the whole HF tensors on that rank.
"""
import contextlib
from unittest import mock

import pytest
import torch

from megatron_spark.bridge.planner import plan, vllm_shard_shapes
from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
from megatron_spark.models.hf_config import parse_hf_config

vllm_linear = pytest.importorskip("vllm.model_executor.layers.linear")
vllm_vocab = pytest.importorskip("vllm.model_executor.layers.vocab_parallel_embedding")

HEADS, HEAD_DIM, FFN, VOCAB = 40, 8, 160, 600
HIDDEN = HEADS * HEAD_DIM


def qwen25_32b_narrow(kv_heads: int, layers: int = 2) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": kv_heads,
            "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}


@contextlib.contextmanager
def vllm_rank(rank: int, tp: int):
    """vLLM's layers ask the TP group for their rank: answer as rank `rank` of `tp`, without a process group."""
    import vllm.distributed.parallel_state as vps
    import vllm.model_executor.parameter as vparam

    with contextlib.ExitStack() as stack:
        for mod in (vllm_linear, vllm_vocab, vparam, vps):
            for fn, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", tp)):
                if hasattr(mod, fn):
                    stack.enter_context(mock.patch.object(mod, fn, return_value=value))
        yield


def vllm_shards(hf: dict[str, torch.Tensor], rank: int, tp: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """vLLM name -> rank `rank`'s tensor, loaded by vLLM's own layer weight loaders from whole HF tensors."""
    out = {}
    f32 = dict(params_dtype=torch.float32)

    def loaded(layer, pieces, name="weight"):
        p = getattr(layer, name)
        p.data.zero_()  # vLLM allocates with torch.empty; the padding rows it never writes are compared as zeros
        for shard_id, t in pieces:
            layer.weight_loader(p, t) if shard_id is None else layer.weight_loader(p, t, shard_id)
        return p.data.clone()

    with vllm_rank(rank, tp):
        for n, t in hf.items():
            if ".q_proj." in n:
                kind = n.rsplit(".", 1)[1]
                qkv = vllm_linear.QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, kv_heads, bias=True, **f32)
                src = [(s, hf[n.replace("q_proj", f"{s}_proj")]) for s in "qkv"]
                out[n.replace("q_proj", "qkv_proj")] = loaded(qkv, src, kind)
            elif ".gate_proj." in n:
                gu = vllm_linear.MergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False, **f32)
                out[n.replace("gate_proj", "gate_up_proj")] = loaded(gu, [(0, t), (1, hf[n.replace("gate", "up")])])
            elif ".o_proj." in n or ".down_proj." in n:
                row = vllm_linear.RowParallelLinear(t.shape[1], t.shape[0], bias=False, **f32)
                out[n] = loaded(row, [(None, t)])
            elif n.endswith("embed_tokens.weight") or n == "lm_head.weight":
                emb = vllm_vocab.VocabParallelEmbedding(VOCAB, HIDDEN, **f32)
                out[n] = loaded(emb, [(None, t)])
            elif not any(s in n for s in (".k_proj.", ".v_proj.", ".up_proj.")):
                out[n] = t.clone()  # norms: replicated on every rank
    return out


def megatron_shards(wmap: WeightMap, hf: dict[str, torch.Tensor], tp: int) -> dict[tuple[str, int], torch.Tensor]:
    """(megatron name, TP rank) -> the trainer's in-memory shard, built from whole HF tensors."""
    out = {}
    for pm in wmap.params:
        full = pm.transform.to_megatron([hf[n] for n in pm.hf])
        for r in range(tp):
            out[(pm.megatron, r)] = pm.transform.shard(full, r, tp)
    return out


def run_plan(transfers, src, targets) -> None:
    for tr in transfers:
        piece = src[(tr.param, tr.src_tp)].narrow(tr.dim, tr.src_offset, tr.length)
        targets[tr.dst_tp][tr.dst_name].narrow(tr.dim, tr.dst_offset, tr.length).copy_(piece)


@pytest.mark.parametrize("train_tp,train_pp,rollout_tp,kv_heads", [
    (2, 1, 4, 8), (8, 2, 2, 8), (1, 1, 8, 8), (4, 2, 1, 8),
    (4, 2, 8, 4), (2, 1, 8, 4), (1, 2, 20, 4),   # rollout TP > KV heads: vLLM replicates each KV head
])
def test_plan_fills_exactly_vllms_own_shards(train_tp, train_pp, rollout_tp, kv_heads):
    shape = parse_hf_config(qwen25_32b_narrow(kv_heads))
    wmap, shapes = WeightMap(shape, tp=train_tp), expected_hf_shapes(shape)
    g = torch.Generator().manual_seed(train_tp * 100 + rollout_tp)
    hf = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    stage = lambda name: (int(name.split("layers.")[1].split(".")[0]) if "layers." in name  # noqa: E731
                          else 0 if "embedding" in name else 1) * train_pp // 2
    transfers = plan(wmap, shapes, train_tp, train_pp, stage, rollout_tp)
    targets = [{n: torch.zeros(s) for n, (s, _) in vllm_shard_shapes(wmap, shapes, rollout_tp, r).items()}
               for r in range(rollout_tp)]
    run_plan(transfers, megatron_shards(wmap, hf, train_tp), targets)
    for r in range(rollout_tp):
        want = vllm_shards(hf, r, rollout_tp, kv_heads)
        assert targets[r].keys() == want.keys(), (r, sorted(targets[r].keys() ^ want.keys()))
        for n, t in want.items():
            assert targets[r][n].shape == t.shape and torch.equal(targets[r][n], t), (r, n)


def test_a_wrong_kv_head_is_caught():
    """The oracle sees a plan that sends another KV head: swap two ranks' K rows and the check must fail."""
    shape = parse_hf_config(qwen25_32b_narrow(4))
    wmap, shapes = WeightMap(shape, tp=2), expected_hf_shapes(shape)
    hf = {n: torch.randn(s, generator=torch.Generator().manual_seed(1)) for n, s in shapes.items()}
    transfers = plan(wmap, shapes, 2, 1, lambda n: 0, 8)
    targets = [{n: torch.zeros(s) for n, (s, _) in vllm_shard_shapes(wmap, shapes, 8, r).items()} for r in range(8)]
    run_plan(transfers, megatron_shards(wmap, hf, 2), targets)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    targets[1][name], targets[2][name] = targets[2][name], targets[1][name]  # ranks 1 and 2 hold different KV heads
    assert not torch.equal(targets[1][name], vllm_shards(hf, 1, 8, 4)[name])
