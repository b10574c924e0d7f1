"""Weight-map transforms on hand-built tensors: layouts a round trip alone would not catch."""
import torch

from megatron_spark.mapping.transforms import GateUpFuse, QKVInterleave, Transform, VocabPad, padded_vocab_size


def test_qkv_interleave_is_per_group_and_not_a_transpose():
    # 4 query heads, 2 groups, head_dim 1: rows named by their content
    q = torch.tensor([[10.], [11.], [12.], [13.]])
    k = torch.tensor([[20.], [21.]])
    v = torch.tensor([[30.], [31.]])
    t = QKVInterleave(num_heads=4, num_groups=2, head_dim=1)
    full = t.to_megatron([q, k, v])
    assert full.squeeze(1).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert [x.squeeze(1).tolist() for x in t.to_hf(full)] == [[10, 11, 12, 13], [20, 21], [30, 31]]
    # TP=2: each rank owns one whole group
    assert t.shard(full, 1, 2).squeeze(1).tolist() == [12, 13, 21, 31]
    segs = t.segments([4, 2, 2])
    assert [(s.mg_start, s.length, s.hf_index, s.hf_start) for s in segs][:3] == [(0, 2, 0, 0), (2, 1, 1, 0),
                                                                                  (3, 1, 2, 0)]


def test_fused_vision_qkv_matches_split():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 5, generator=g) for _ in range(3))
    split = QKVInterleave(3, 3, 2)
    fused = QKVInterleave(3, 3, 2, fused_hf=True)
    assert torch.equal(split.to_megatron([q, k, v]), fused.to_megatron([torch.cat([q, k, v])]))
    assert torch.equal(fused.to_hf(fused.to_megatron([torch.cat([q, k, v])]))[0], torch.cat([q, k, v]))


def test_gate_up_tp_shard_holds_both_halves():
    gate = torch.arange(4.).view(4, 1)
    up = torch.arange(10., 14.).view(4, 1)
    t = GateUpFuse()
    full = t.to_megatron([gate, up])
    shards = [t.shard(full, r, 2) for r in range(2)]
    assert shards[0].squeeze(1).tolist() == [0, 1, 10, 11]
    assert shards[1].squeeze(1).tolist() == [2, 3, 12, 13]
    assert torch.equal(t.unshard(shards), full)


def test_vocab_padding_and_row_parallel():
    t = VocabPad(5, 8)
    emb = torch.arange(10.).view(5, 2)
    full = t.to_megatron([emb])
    assert full.shape == (8, 2) and full[5:].abs().sum() == 0
    assert torch.equal(t.to_hf(full)[0], emb)
    row = Transform(tp_dim=1)
    w = torch.arange(8.).view(2, 4)
    assert row.shard(w, 1, 2).tolist() == [[2, 3], [6, 7]]
    assert padded_vocab_size(503, 128, 2) == 512 and padded_vocab_size(151936, 128, 8) == 151936
    assert padded_vocab_size(500, 128, 3) == 768  # lcm(128, 3) = 384


def test_shard_runs_agree_with_tensor_shards():
    """shard_runs (what the loader reads and the planner plans with) == shard(to_megatron(...)) for every kind."""
    g = torch.Generator().manual_seed(0)
    cases = [
        (QKVInterleave(8, 2, 3), [torch.randn(24, 5, generator=g), torch.randn(6, 5, generator=g),
                                  torch.randn(6, 5, generator=g)], 2),
        (QKVInterleave(4, 4, 2, fused_hf=True), [torch.randn(24, 3, generator=g)], 4),
        (GateUpFuse(), [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)], 4),
        (VocabPad(13, 16), [torch.randn(13, 3, generator=g)], 2),
        (Transform(tp_dim=1), [torch.randn(3, 8, generator=g)], 2),
        (Transform(tp_dim=0), [torch.randn(8, 3, generator=g)], 2),
        (Transform(None), [torch.randn(4, generator=g)], 2),
    ]
    for t, hf, tp in cases:
        dim = 1 if t.tp_dim == 1 else 0
        names = [f"t{i}" for i in range(len(hf))]
        full = t.to_megatron(hf)
        for r in range(tp):
            parts = []
            for run in t.shard_runs(names, [x.shape[dim] for x in hf], r, tp):
                if run.hf is None:
                    shape = list(hf[0].shape)
                    shape[dim] = run.length
                    parts.append(torch.zeros(shape))
                else:
                    parts.append(hf[names.index(run.hf)].narrow(dim, run.hf_start, run.length))
            assert torch.equal(torch.cat(parts, dim=dim), t.shard(full, r, tp)), (t, r)
