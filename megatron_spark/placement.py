"""Which rank does what, decided in one place.

    ranks:    0 1 2 3 4 5 6 7                          (world = 8)
    engines:  [ e0  ][ e1  ][ e2  ][ e3  ]            rollout TP = 2: consecutive blocks (vLLM external launcher)
    prompts:  e0 gets prompts 0..15, e1 16..31, ...   contiguous shares, sizes differ by at most one; a prompt and
                                                      its n samples (one GRPO group) never leave their engine
    training: ParallelLayout's DP ranks; each optimizer step's global batch is split over them by cost
              (Karmarkar-Karp on sequence length); PP stages and TP ranks of one DP replica see the same samples

    disaggregated (rollout.placement=disaggregated, rollout.num_ranks=4, world = 12):
    ranks:    0 1 2 3 4 5 6 7 | 8 9 10 11
    roles:    [ training      ] [ engines ]           training ranks run only Megatron, rollout ranks only vLLM;
                                                      each role is its own torch.distributed world (what
                                                      megatron-core and vLLM's external launcher each expect),
                                                      joined by one job group over all ranks (rollout/remote.py)

Everything here is a pure function of sizes and seeds, so every rank computes the same answer without talking.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RolloutPlacement:
    """Rollout engines over the job's ranks: colocated, `world / engine_size` engines of `engine_size` consecutive
    ranks over every rank; disaggregated (`rollout_ranks` > 0), engines over the last `rollout_ranks` ranks only and
    training over the ranks before them. Ranks are global (the job's)."""
    world: int
    engine_size: int  # rollout tensor parallel size (vLLM TP)
    # the rank that scores rewards (one process pool for the whole world) and broadcasts them
    reward_rank: int = 0
    # the rank that speaks for the run: the progress bar, metrics files, messages, the SLURM stop marker
    writer_rank: int = 0
    rollout_ranks: int = 0  # 0: colocated; else the ranks that only run engines (rollout.num_ranks)

    def __post_init__(self) -> None:
        span = self.rollout_ranks or self.world
        if self.engine_size < 1 or span % self.engine_size:
            what = f"the {span} rollout ranks" if self.rollout_ranks else f"the world size {self.world}"
            raise ValueError(f"rollout TP = {self.engine_size} must divide {what}; "
                             f"choose rollout.tensor_parallel_size accordingly")
        if self.rollout_ranks and not 0 < self.rollout_ranks < self.world:
            raise ValueError(f"rollout.num_ranks = {self.rollout_ranks} must leave training ranks in a world of "
                             f"{self.world}")

    @classmethod
    def from_config(cls, rollout_cfg, world: int) -> "RolloutPlacement":
        ro = rollout_cfg
        return cls(world, ro.tensor_parallel_size,
                   rollout_ranks=ro.num_ranks if ro.placement == "disaggregated" else 0)

    # -- roles ---------------------------------------------------------------------------------------------------
    @property
    def disaggregated(self) -> bool:
        return self.rollout_ranks > 0

    @property
    def train_world(self) -> int:
        """Ranks that run Megatron: the first `train_world` of the job."""
        return self.world - self.rollout_ranks

    @property
    def first_engine_rank(self) -> int:
        return self.train_world if self.disaggregated else 0

    def trains(self, rank: int) -> bool:
        return rank < self.train_world

    def runs_engine(self, rank: int) -> bool:
        return rank >= self.first_engine_rank

    def role_world(self, rank: int) -> tuple[str, int, int]:
        """(role, rank in the role's world, the role's world size): the default process group a rank joins."""
        if not self.disaggregated:
            return "all", rank, self.world
        if self.trains(rank):
            return "train", rank, self.train_world
        return "rollout", rank - self.train_world, self.rollout_ranks

    # the training rank that hands prompts to disaggregated engines and receives their samples
    request_rank: int = 0

    # -- engines -------------------------------------------------------------------------------------------------
    @property
    def engines(self) -> int:
        return (self.rollout_ranks or self.world) // self.engine_size

    def engine_of(self, rank: int) -> int:
        return (rank - self.first_engine_rank) // self.engine_size

    def engine_ranks(self, engine: int) -> range:
        """The global ranks of an engine's rollout TP group, in its TP rank order."""
        first = self.first_engine_rank + engine * self.engine_size
        return range(first, first + self.engine_size)

    def writes(self, rank: int) -> bool:
        return rank == self.writer_rank

    @staticmethod
    def replica_leaders(layout) -> list[int]:
        """One rank per training data-parallel replica (its first TP rank of its first pipeline stage): where a
        replica's per-rank figures are read once."""
        return [layout.rank_of(dp=d) for d in range(layout.dp)]

    @staticmethod
    def replica_of(engine: int, dp: int) -> int:
        """The training data-parallel replica whose weights feed this engine at every sync: engines are dealt
        round-robin over the replicas, so the sync's sending load is spread over all of them."""
        return engine % dp

    def is_leader(self, rank: int) -> bool:
        """The first rank of its engine: the one that reports the engine's outputs (all its ranks hold them)."""
        return (rank - self.first_engine_rank) % self.engine_size == 0

    def prompt_share(self, n_prompts: int, engine: int) -> range:
        """Contiguous, balanced: the first `n_prompts % engines` engines take one prompt more."""
        base, extra = divmod(n_prompts, self.engines)
        start = engine * base + min(engine, extra)
        return range(start, start + base + (engine < extra))


def sampling_seed(base_seed: int, step: int, period: str, engine: int, round: int = 0) -> int:
    """Reproducible, and different for every engine, step, period (below 500k steps) and refill round of dynamic
    sampling (below 100 engines): no two engines draw the same samples. Engine 0 of round 0 keeps the seed a single
    engine has always used, so one-engine runs reproduce."""
    return base_seed * 100_003 + step * 2 + (period == "reward") + engine * 1_000_003 + round * 100_000_007


def balanced_partition(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of `costs` split into `parts` sets of near-equal total cost (Karmarkar-Karp largest differencing).

    Every index appears exactly once; each set lists its indices in increasing order; deterministic. Sets may hold
    different numbers of items (that is what balancing by cost means)."""
    if parts < 1:
        raise ValueError(f"balanced_partition: parts must be >= 1, got {parts}")
    tie = itertools.count()
    heap: list = []
    for i, c in enumerate(costs):
        sets = [(float(c), [i])] + [(0.0, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-float(c), next(tie), sets))
    if not heap:
        return [[] for _ in range(parts)]
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # pair a's heaviest set with b's lightest: the differences cancel
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(tie), merged))
    return [sorted(items) for _, items in heap[0][2]]
