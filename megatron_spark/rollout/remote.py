"""Disaggregated engines: rollout ranks that only generate, training ranks that only train, and what joins them.

Process groups. megatron-core and vLLM's external launcher each build their groups over the default world and
expect every rank of it to take part, so each role gets a default world of its own (`init_role_worlds`): the
training ranks [0, T) form one, the rollout ranks [T, W) another, both from the job's one rendezvous store under
different prefixes. One more group spans the whole job, the *job group* (`JobGroup`; not the resharding bridge,
which sends the weights through it): a gloo group for the commands, the prompts and the samples (pickled objects)
and, on CPU, the weights; on a GPU the weights go through an NCCL group of the same ranks. Its groups are built
directly from the store (`ProcessGroupGloo` / `ProcessGroupNCCL`), outside torch.distributed's registry (whose ranks
are the default world's), so they are used through their own methods.

Protocol (every message from the training side comes from `placement.request_rank`):

    trainer rank 0                                  each rollout rank (`EngineServer.serve`)
    ("generate", ticket, parts)                  ->   generate its engine's share of each part (one part per
                                                       period of a round, with its sampling; all TP ranks alike)
                         <- (ticket, [EngineWork])     the engine's first rank answers
    ("sync",)  + the bridge plan's weight messages ->  load them through vLLM's loader (`WeightSync`)
    ("stop",)                                      ->  return

A command is only ever sent to an engine that is waiting for one, and its answer is received before the next
command to it: each side's sends complete (gloo's and NCCL's point-to-point messages block until matched).
"""
from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_spark.placement import RolloutPlacement
from megatron_spark.rollout.engine import Sampling
from megatron_spark.rollout.protocols import EngineWork, GenerationPart

_OBJECT_TAG = 7  # commands and samples; the weight messages use tag 0


def job_store(timeout_s: int):
    """The job's rendezvous store (torchrun's agent store, or one hosted by rank 0 outside an agent), with a
    prefix per torchrun attempt (a restarted attempt must not meet the previous one's keys)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/megatron_spark/disaggregated/attempt_{attempt}", store)


class JobGroup:
    """The group of every rank of the job (global ranks): objects and CPU tensors over gloo; on a GPU, CUDA tensors
    over NCCL."""

    def __init__(self, store, rank: int, world: int, timeout_s: int):
        self.rank, self.world = rank, world
        timeout = timedelta(seconds=timeout_s)
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("bridge_gloo", store), rank, world, timeout)
        self.cuda = None
        if torch.cuda.is_available():  # weight messages (a 32B sync enqueues all its sends at once: the same limit)
            from megatron_spark import compat

            self.cuda = dist.ProcessGroupNCCL(dist.PrefixStore("bridge_nccl", store), rank, world,
                                              compat.nccl_options(timeout))

    def group_for(self, tensor: torch.Tensor):
        return self.cuda if tensor.is_cuda else self.cpu

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        return self.group_for(tensor).send([tensor], peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0):
        return self.group_for(tensor).recv([tensor], peer, tag)

    def send_object(self, obj: Any, peer: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.cpu.send([torch.tensor([data.numel()], dtype=torch.int64)], peer, _OBJECT_TAG).wait()
        self.cpu.send([data], peer, _OBJECT_TAG).wait()

    def recv_object(self, peer: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self.cpu.recv([size], peer, _OBJECT_TAG).wait()
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.cpu.recv([data], peer, _OBJECT_TAG).wait()
        return pickle.loads(data.numpy().tobytes())

    def barrier(self) -> None:
        self.cpu.barrier().wait()


def init_role_worlds(placement: RolloutPlacement, backend: str, timeout_s: int) -> JobGroup:
    """This rank's default world (its role's ranks, renumbered from 0) and the job group over the whole job. RANK and
    WORLD_SIZE are set to the role's values (megatron-core and vLLM read them); SPARK_JOB_RANK keeps the job's."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != placement.world:
        raise ValueError(f"the placement expects {placement.world} ranks but the job has {world}")
    store = job_store(timeout_s)
    role, role_rank, role_world = placement.role_world(rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=dist.PrefixStore(f"role_{role}", store), rank=role_rank,
                            world_size=role_world, timeout=timedelta(seconds=timeout_s))
    os.environ.update(SPARK_JOB_RANK=str(rank), SPARK_JOB_WORLD_SIZE=str(world), RANK=str(role_rank),
                      WORLD_SIZE=str(role_world))
    return JobGroup(store, rank, world, timeout_s)


def job_rank() -> int:
    """This process's rank in the job (the job group's numbering), in either placement."""
    return int(os.environ.get("SPARK_JOB_RANK", os.environ.get("RANK", "0")))


class EngineServer:
    """A rollout rank's whole life: wait for a command, do it, until told to stop."""

    def __init__(self, engine, sync, job_group: JobGroup, placement: RolloutPlacement):
        self.engine, self.sync, self.job_group, self.placement = engine, sync, job_group, placement
        self.me = job_group.rank
        self.leader = placement.is_leader(self.me)

    def serve(self) -> int:
        """Returns the number of generation requests served."""
        src, served = self.placement.request_rank, 0
        while True:
            cmd = self.job_group.recv_object(src)
            if cmd[0] == "stop":
                return served
            if cmd[0] == "sync":
                self.sync.push(self.engine)
            elif cmd[0] == "generate":
                _, ticket, parts = cmd
                works = []
                for prompts, requests, seed, sampling in parts:
                    t0 = time.perf_counter()
                    samples = self.engine.generate(requests, seed=seed, **sampling) if requests else []
                    works.append(EngineWork(prompts, samples, time.perf_counter() - t0))
                if self.leader:
                    self.job_group.send_object((ticket, works), src)
                served += 1
            else:
                raise RuntimeError(f"rollout rank {self.me}: unknown command {cmd[0]!r}")


class RemoteRollouts:
    """The training side of disaggregated engines (every training rank holds one; rank `request_rank` talks)."""

    def __init__(self, job_group: JobGroup, sync, placement: RolloutPlacement, sampling: Sampling):
        self.job_group, self.sync, self.placement, self.sampling = job_group, sync, placement, sampling
        self.me = job_group.rank
        self.talks = self.me == placement.request_rank
        self.tickets = 0
        self.outstanding: Optional[int] = None  # the ticket the engines are working on (at most one)

    def submit(self, parts: list[GenerationPart]) -> int:
        """Hand every engine its share of each part's prompts; returns at once with a ticket for `collect`."""
        if self.outstanding is not None:
            raise RuntimeError("a generation is already in flight: collect it first")
        self.tickets += 1
        if self.talks:
            p = self.placement
            for e in range(p.engines):
                shares = [list(p.prompt_share(part.n_prompts, e)) for part in parts]
                cmd = ("generate", self.tickets,
                       [(share, [part.request(i) for i in share], part.seed(e),
                         self.sampling.with_overrides(part.overrides)) for part, share in zip(parts, shares)])
                for r in p.engine_ranks(e):
                    self.job_group.send_object(cmd, r)
        self.outstanding = self.tickets
        return self.tickets

    def collect(self, ticket: int) -> list[list[EngineWork]]:
        """Every engine's answer to `ticket` (per part, per engine), on every training rank (a collective of the
        training world)."""
        if ticket != self.outstanding:
            raise RuntimeError(f"collect({ticket}): the engines are working on {self.outstanding}")
        box: list = [None]
        if self.talks:
            answers = []
            for e in range(self.placement.engines):
                got, works = self.job_group.recv_object(self.placement.engine_ranks(e)[0])
                if got != ticket:
                    raise RuntimeError(f"engine {e} answered request {got}, expected {ticket}")
                answers.append(works)
            box = [[list(per_part) for per_part in zip(*answers)]]
        # (the training world numbers its ranks as the job does: the request rank is the same number in both)
        dist.broadcast_object_list(box, src=self.placement.request_rank)
        self.outstanding = None
        return box[0]

    def push(self) -> None:
        """Send the trainer's weights to every engine (all training ranks: each sends its shards)."""
        if self.outstanding is not None:
            raise RuntimeError("weights cannot change under a generation in flight: collect it first")
        if self.talks:
            for r in range(self.placement.first_engine_rank, self.placement.world):
                self.job_group.send_object(("sync",), r)
        for _ in self.sync.stream():  # (training ranks only send: nothing comes out)
            pass

    def sleep(self) -> None:
        pass  # (the engines have GPUs of their own)

    def close(self) -> None:
        """Tell the engines to stop (after collecting what they are still working on)."""
        if self.outstanding is not None:
            self.collect(self.outstanding)
        if self.talks:
            for r in range(self.placement.first_engine_rank, self.placement.world):
                self.job_group.send_object(("stop",), r)
