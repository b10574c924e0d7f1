"""Every rank's posted point-to-point ops of a weight sync, replayed in one process under NCCL's rules.

gloo is truly asynchronous, so the CPU tests cannot see a posting order that deadlocks under NCCL. NCCL's rules, as
modelled here:
- ungrouped ops between two ranks run in posting order on one stream per pair (`ProcessGroupNCCL::pointToPoint`:
  one communicator and stream per rank pair), and a send does not complete until its receive runs on the peer (the
  conservative reading of "blocking for the GPU" for messages above NCCL's buffer, which the syncs' are: whole
  embeddings, 0.2-0.5 GiB);
- the ops of one `batch_isend_irecv` group progress together and the group completes when all of them have;
  a rank's groups run one after another on its stream.
The routes and buckets are planned from shapes (no tensors) by the same functions the live sync uses
(`bridge.sync.plan_routes`, `executor.make_buckets`, `executor.bucket_messages`) for the shipped GPU examples and
the tiny test layouts, in both sync targets. The executor posts each bucket as one group: that must complete. The
previous executor posted, per peer, every send and then every receive, ungrouped: that must be reported as a
deadlock where two ranks send to each other in one bucket (all three shipped layouts have such pairs).
"""
import math
from collections import defaultdict, deque
from pathlib import Path

import pytest
import yaml

from megatron_spark.bridge.executor import bucket_messages, make_buckets
from megatron_spark.bridge.sync import plan_routes
from megatron_spark.mapping.table import WeightMap
from megatron_spark.models.hf_config import parse_hf_config
from megatron_spark.parallel import ParallelLayout
from megatron_spark.planner.model import load_model

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 503,
             "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}
TINY_VL = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 500, "hidden_size": 128,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 503, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
           "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
           "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                             "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
                             "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
                             "hidden_act": "silu"}}


def posted_ops(routes, shapes, elem_bytes, bucket_bytes, world):
    """rank -> list (one entry per bucket) of the messages it posts, each as (key, send, numel); key = (src, dst,
    k) numbers the k-th message from src to dst, which is how both NCCL and gloo pair a send with its receive."""
    buckets = make_buckets([r.t for r in routes], shapes, elem_bytes, bucket_bytes)
    by_dst = defaultdict(list)
    for r in routes:
        by_dst[r.t.dst_name].append(r)
    out = {}
    for me in range(world):
        count = defaultdict(int)
        per_bucket = []
        for bucket in buckets:
            ops = []
            for m in bucket_messages(by_dst, bucket, me)[0]:
                src, dst = (me, m.peer) if m.send else (m.peer, me)
                ops.append(((src, dst, count[(src, dst)]), m.send, m.numel))
                count[(src, dst)] += 1
            per_bucket.append(ops)
        out[me] = per_bucket
    return out


def _check_sizes(ops):
    sizes = {}
    for per_bucket in ops.values():
        for bucket in per_bucket:
            for key, send, numel in bucket:
                assert sizes.setdefault((key, send), numel) == numel
    for (key, send), n in sizes.items():
        assert sizes.get((key, not send)) == n, f"message {key}: send and receive disagree ({n})"


def replay_grouped(ops) -> list:
    """The executor's posting: each rank's bucket as one group. Returns [] when everything completes, else the
    stuck (rank, bucket, waiting ops)."""
    groups = {r: [b for b in per_bucket if b] for r, per_bucket in ops.items()}
    pos = {r: 0 for r in groups}
    done: set = set()
    while True:
        active = {r: {(k, s) for k, s, _ in groups[r][pos[r]]} for r in groups if pos[r] < len(groups[r])}
        if not active:
            return []
        progressed = False
        for r, mine in active.items():
            for key, send in mine:
                peer = key[1] if send else key[0]
                if (key, send) not in done and (key, not send) in active.get(peer, ()):
                    done |= {(key, send), (key, not send)}
                    progressed = True
        for r, mine in active.items():
            if mine <= done:
                pos[r] += 1
                progressed = True
        if not progressed:
            return [(r, pos[r], sorted(k for k, s in mine if (k, s) not in done)[:3]) for r, mine in active.items()]


def replay_ungrouped_per_peer(ops, double_buffer: bool = False) -> list:
    """The previous executor's posting: per bucket, per peer in rank order, every send then every receive, each its
    own op; one in-order stream per rank pair; the CPU waits for bucket k before posting k+1 (k+2 with double
    buffering). Returns [] when everything completes, else the stuck stream heads."""
    order = {}
    for r, per_bucket in ops.items():
        order[r] = []
        for bucket in per_bucket:
            by_peer = defaultdict(list)
            for key, send, _ in bucket:
                by_peer[key[1] if send else key[0]].append((key, send))
            order[r].append([op for p in sorted(by_peer) for op in sorted(by_peer[p], key=lambda o: not o[1])])
    streams = defaultdict(deque)
    posted = {r: 0 for r in order}
    open_ops = {r: defaultdict(set) for r in order}  # bucket -> ops not yet complete
    ahead = 2 if double_buffer else 1
    while True:
        for r in order:  # post every bucket the CPU may post now
            while posted[r] < len(order[r]) and all(not open_ops[r][b] for b in range(posted[r] - ahead + 1)):
                for key, send in order[r][posted[r]]:
                    streams[(r, key[1] if send else key[0])].append((key, send))
                    open_ops[r][posted[r]].add((key, send))
                posted[r] += 1
        progressed = False
        for (r, p), q in list(streams.items()):
            if q and streams[(p, r)] and streams[(p, r)][0] == (q[0][0], not q[0][1]):
                key, send = q.popleft()
                streams[(p, r)].popleft()
                for rank, op in ((r, (key, send)), (p, (key, not send))):
                    for b in open_ops[rank].values():
                        b.discard(op)
                progressed = True
        if not any(streams.values()) and all(posted[r] == len(order[r]) for r in order):
            return []
        if not progressed:
            return sorted({tuple(sorted((r, p))) for (r, p), q in streams.items() if q})


def shipped(name: str):
    """(model shape, layout, rollout TP, bucket MiB, world) of a shipped example config."""
    cfg = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    par, ro = cfg["parallel"], cfg["rollout"]
    model = {"spark_7b": "qwen2.5-7b", "spark_vl_7b": "qwen2.5-vl-7b", "spark_vl_32b": "qwen2.5-vl-32b"}[name]
    world = {"spark_vl_32b": 16}.get(name, 8)
    layout = ParallelLayout(tp=par["tensor_model_parallel_size"], pp=par.get("pipeline_model_parallel_size", 1),
                            world_size=world)
    return load_model(model), layout, ro["tensor_parallel_size"], ro.get("sync_bucket_mb", 512), world


CASES = {f"{n}/{t}": (lambda n=n: shipped(n), t) for n in ("spark_7b", "spark_vl_7b", "spark_vl_32b")
         for t in ("vllm_tp", "hf_full")}
CASES.update({
    f"tiny_{kind}_tp{tp}pp{pp}_rtp{rtp}/{t}": (
        lambda kind=kind, tp=tp, pp=pp, rtp=rtp: (parse_hf_config(TINY_TEXT if kind == "text" else TINY_VL),
                                                  ParallelLayout(tp=tp, pp=pp, world_size=2), rtp, 8, 2), t)
    for kind in ("text", "vl") for tp, pp, rtp in ((2, 1, 2), (1, 2, 2), (2, 1, 1), (1, 1, 2), (1, 2, 1))
    for t in ("vllm_tp", "hf_full") if not (tp == rtp and pp == 1 and t == "vllm_tp")})  # (that one: all local)
# (each example's own sync target, and the other one; bf16 on the GPU examples, fp32 on the CPU ones)


def case_ops(name):
    make, target = CASES[name]
    shape, layout, rtp, bucket_mb, world = make()
    routes, shapes = plan_routes(WeightMap(shape, tp=layout.tp), layout, rtp, target, world)
    elem = 2 if name.startswith("spark") else 4
    return posted_ops(routes, shapes, elem, bucket_mb << 20, world)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_executor_completes_under_nccl_rules(name):
    ops = case_ops(name)
    _check_sizes(ops)
    assert any(b for per in ops.values() for b in per), "nothing to send: the case tests nothing"
    assert replay_grouped(ops) == []


# where the previous executor's order deadlocks (ranks that send to each other inside one bucket)
OLD_DEADLOCKS = ["spark_7b/vllm_tp", "spark_vl_7b/vllm_tp", "spark_vl_32b/vllm_tp", "tiny_text_tp2pp1_rtp2/hf_full",
                 "tiny_text_tp1pp2_rtp2/hf_full", "tiny_vl_tp2pp1_rtp2/hf_full", "tiny_text_tp2pp1_rtp1/vllm_tp"]


@pytest.mark.parametrize("name", OLD_DEADLOCKS)
def test_the_previous_posting_order_deadlocks(name):
    """The replay can fail: the old per-peer, ungrouped order hangs (single and double buffered) where the issue's
    replay found mutual pairs."""
    ops = case_ops(name)
    assert replay_ungrouped_per_peer(ops) != []
    assert replay_ungrouped_per_peer(ops, double_buffer=True) != []


def test_a_one_way_sync_is_fine_either_way():
    """Sanity of the model: with no pair sending both ways (TP1 DP2 -> one engine of rTP2: replica 0 on rank 0
    sends rank 1 everything), the ungrouped order completes too."""
    ops = case_ops("tiny_text_tp1pp1_rtp2/hf_full")
    assert any(b for b in ops[0]) and not any(b for b in ops[1] if any(send for _, send, _ in b))
    assert replay_ungrouped_per_peer(ops) == []


# Disaggregated engines (rollout ranks of their own): the executor posts through the job-wide bridge group, op by
# op, ungrouped (rollout/remote.py). Every message goes from a training rank to a rollout rank, so no pair sends
# both ways: the ungrouped per-peer order must complete under NCCL's rules, single and double buffered.
DISAGG_CASES = {
    # SPARK's 32B split on 16 GPUs: training TP8 x DP1 on 8 (here TP4 x PP2), four engines of rollout TP2 on 8
    "vl32b_tp4pp2_to_4x_rtp2": (lambda: load_model("qwen2.5-vl-32b"), dict(tp=4, pp=2), 8, 2, 8),
    "vl7b_tp2dp2_to_2x_rtp2": (lambda: load_model("qwen2.5-vl-7b"), dict(tp=2), 4, 2, 4),
    "tiny_vl_tp2_to_1x_rtp1": (lambda: parse_hf_config(TINY_VL), dict(tp=2), 2, 1, 1),
    "tiny_text_pp2_to_2x_rtp1": (lambda: parse_hf_config(TINY_TEXT), dict(pp=2), 2, 1, 2),
}


@pytest.mark.parametrize("name", sorted(DISAGG_CASES))
def test_disaggregated_sync_completes_ungrouped_under_nccl_rules(name):
    from megatron_spark.placement import RolloutPlacement

    make, lay, train_world, rtp, rollout_ranks = DISAGG_CASES[name]
    layout = ParallelLayout(world_size=train_world, **lay)
    world = train_world + rollout_ranks
    placement = RolloutPlacement(world, rtp, rollout_ranks=rollout_ranks)
    routes, shapes = plan_routes(WeightMap(make(), tp=layout.tp), layout, rtp, "hf_full", world, placement)
    assert all(placement.trains(r.src) and placement.runs_engine(r.dst) for r in routes)
    assert {r.dst for r in routes} == set(range(train_world, world))  # every rollout rank receives
    ops = posted_ops(routes, shapes, 2, 512 << 20, world)
    _check_sizes(ops)
    assert replay_ungrouped_per_peer(ops) == [] and replay_ungrouped_per_peer(ops, double_buffer=True) == []
    # each engine receives every HF element exactly once per sync (whole tensors: target hf_full)
    per_engine = sum(r.t.numel for r in routes if r.dst in placement.engine_ranks(0))
    assert per_engine == rtp * sum(math.prod(s) for s in shapes.values())
