"""Colocated engines behind the same interface as disaggregated ones (`rollout/remote.py`): every rank runs its
engine's share of the prompts in its own process, then all ranks gather every engine's samples. `submit` does the
work at once (the engine shares the GPU with training: nothing can overlap), `collect` hands it over."""
from __future__ import annotations

import time
import torch.distributed as dist

from megatron_spark.placement import RolloutPlacement
from megatron_spark.rollout.engine import Sampling
from megatron_spark.rollout.protocols import EngineWork, GenerationPart


class ColocatedRollouts:
    def __init__(self, engine, sync, placement: RolloutPlacement, rank: int, sampling: Sampling):
        self.engine, self.sync, self.placement, self.rank = engine, sync, placement, rank
        self.sampling = sampling
        self.engine_id = placement.engine_of(rank)
        self.done: dict[int, list[EngineWork]] = {}
        self.tickets = 0

    def submit(self, parts: list[GenerationPart]) -> int:
        self.engine.wake_up()  # (asleep after a period's generation, or during a checkpoint; a no-op when awake)
        works = []
        for part in parts:
            share = list(self.placement.prompt_share(part.n_prompts, self.engine_id))
            t0 = time.perf_counter()
            local = self.engine.generate([part.request(i) for i in share], seed=part.seed(self.engine_id),
                                         **self.sampling.with_overrides(part.overrides)) if share else []
            works.append(EngineWork(share, local, time.perf_counter() - t0))
        mine = works if self.placement.is_leader(self.rank) else None
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.tickets += 1
        self.done[self.tickets] = [list(per_part) for per_part in zip(*(w for w in gathered if w is not None))]
        return self.tickets

    def collect(self, ticket: int) -> list[list[EngineWork]]:
        return self.done.pop(ticket)

    def push(self) -> None:
        """Bring the engine up to date with the trainer's weights (every rank, after each update)."""
        self.engine.wake_up(["weights"])  # weights back in place before the sync writes them; the KV cache only
        self.sync.push(self.engine)        # after it (the sync's buckets need the memory), so the engine leaves
        self.engine.wake_up(["kv_cache"])  # here whole: a checkpoint can put it to sleep, an evaluation can use it

    def sleep(self) -> None:
        """GPU: free the KV cache and offload vLLM's weights while Megatron trains (CPU: no-op)."""
        self.engine.sleep()

    def close(self) -> None:
        pass
