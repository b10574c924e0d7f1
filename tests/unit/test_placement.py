"""Which rank does what: engine blocks, prompt shares, seeds, and the cost-balanced DP split."""
import random

import pytest

from megatron_spark.placement import RolloutPlacement, balanced_partition, sampling_seed


def test_engines_are_consecutive_rank_blocks():
    p = RolloutPlacement(world=8, engine_size=2)
    assert p.engines == 4
    assert [p.engine_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r for r in range(8) if p.is_leader(r)] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="rollout TP = 3 must divide the world size 8"):
        RolloutPlacement(world=8, engine_size=3)


@pytest.mark.parametrize("n,engines", [(16, 4), (17, 4), (3, 4), (0, 2), (64, 8), (7, 1)])
def test_prompt_shares_cover_every_prompt_once_and_balance(n, engines):
    p = RolloutPlacement(world=engines * 2, engine_size=2)
    shares = [p.prompt_share(n, e) for e in range(engines)]
    assert [i for s in shares for i in s] == list(range(n))  # contiguous, in order, each prompt once
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


def test_sampling_seeds_differ_across_engines_steps_and_periods():
    seeds = {sampling_seed(42, step, period, e) for step in range(50) for period in ("infer", "reward")
             for e in range(8)}
    assert len(seeds) == 50 * 2 * 8
    assert sampling_seed(42, 3, "infer", 1) == sampling_seed(42, 3, "infer", 1)
    # dynamic sampling's refill rounds draw new samples; round 0 keeps the seed runs without it have always used
    rounds = {sampling_seed(42, step, period, e, r) for step in range(50) for period in ("infer", "reward")
              for e in range(64) for r in range(4)}
    assert len(rounds) == 50 * 2 * 64 * 4
    assert sampling_seed(42, 3, "infer", 1, 0) == sampling_seed(42, 3, "infer", 1)


def test_karmarkar_karp_hand_case():
    # the classic example: {8, 7, 6, 5, 4} into 2 sets -> KK finds sums 16 / 14 ({8, 6} + ... ) within 2 of optimum
    parts = balanced_partition([8, 7, 6, 5, 4], 2)
    sums = sorted(sum([8, 7, 6, 5, 4][i] for i in s) for s in parts)
    assert sorted(i for s in parts for i in s) == [0, 1, 2, 3, 4]
    assert sums[1] - sums[0] <= 2


@pytest.mark.parametrize("seed", range(5))
def test_balanced_partition_beats_round_robin_and_covers_everything(seed):
    rnd = random.Random(seed)
    costs = [rnd.randint(300, 3000) + rnd.randint(20, 768) for _ in range(64)]
    for parts in (2, 4, 8):
        sets = balanced_partition(costs, parts)
        assert len(sets) == parts
        assert sorted(i for s in sets for i in s) == list(range(64))
        assert all(s == sorted(s) for s in sets)
        loads = [sum(costs[i] for i in s) for s in sets]
        rr = [sum(costs[i::parts]) for i in range(parts)]
        assert max(loads) - min(loads) <= max(rr) - min(rr)
        assert max(loads) <= sum(costs) / parts + max(costs)  # never worse than one item above the mean
    assert balanced_partition(costs, 1) == [list(range(64))]
    assert balanced_partition([], 3) == [[], [], []]
    assert balanced_partition(costs, 3) == balanced_partition(costs, 3)  # deterministic


def test_one_rank_speaks_for_the_run_and_one_scores():
    """The run's voice (progress, metrics, messages, the stop marker) and the reward scorer are placement's answers,
    one rank each, the same on every rank."""
    p = RolloutPlacement(world=4, engine_size=2)
    assert [r for r in range(4) if p.writes(r)] == [0] and p.reward_rank == 0
    moved = RolloutPlacement(world=4, engine_size=2, reward_rank=2, writer_rank=3)
    assert [r for r in range(4) if moved.writes(r)] == [3] and moved.reward_rank == 2


def test_disaggregated_roles_engines_and_worlds():
    """12 ranks, 4 of them for engines of rollout TP 2: training on 0-7, engines on 8-9 and 10-11; each role's
    default world renumbers its ranks from 0."""
    p = RolloutPlacement(world=12, engine_size=2, rollout_ranks=4)
    assert p.disaggregated and p.train_world == 8 and p.engines == 2
    assert [list(p.engine_ranks(e)) for e in range(2)] == [[8, 9], [10, 11]]
    assert [p.trains(r) for r in (0, 7, 8, 11)] == [True, True, False, False]
    assert [p.runs_engine(r) for r in (7, 8)] == [False, True]
    assert p.engine_of(11) == 1 and p.is_leader(10) and not p.is_leader(11)
    assert p.role_world(3) == ("train", 3, 8) and p.role_world(10) == ("rollout", 2, 4)
    assert p.request_rank == p.reward_rank == p.writer_rank == 0  # all on training rank 0
    colocated = RolloutPlacement(world=4, engine_size=2)
    assert colocated.role_world(3) == ("all", 3, 4) and colocated.trains(3) and colocated.runs_engine(0)
    with pytest.raises(ValueError, match="must divide the 3 rollout ranks"):
        RolloutPlacement(world=8, engine_size=2, rollout_ranks=3)
    with pytest.raises(ValueError, match="must leave training ranks"):
        RolloutPlacement(world=4, engine_size=2, rollout_ranks=4)
