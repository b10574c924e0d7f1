"""One-step off-policy (algorithm.max_staleness=1): the round the engines generate while the trainer trains.

A round is drawn (`draw_round`: the next infer batch and, when the recycling queue holds one, its next reward batch),
handed to the engines, and trained on one step later. `InFlight` keeps it across a checkpoint: saving waits for the
engines and stores its prompts and samples, so a resumed run trains on exactly them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

from megatron_spark.recycle import AuxQueue
from megatron_spark.rollout.engine import Sample
from megatron_spark.samples import PromptCache, Task

Receive = Callable[[list[tuple[str, int]], int, int], list[tuple[list, dict]]]  # (names, ticket, version)


@dataclass
class Round:
    """One step's prompts handed to the engines and, once received, their samples."""
    step: int                               # the step that trains on it
    version: int                            # the policy version (step) whose weights generate it
    episode: int
    parts: list[tuple[str, list[Task]]]     # ("infer", tasks) and, when the queue held a batch, ("reward", tasks)
    ticket: Optional[int] = None
    received: Optional[list[tuple[list, dict]]] = None  # per part: samples per task, generation metrics
    prompts: Optional[list[PromptCache]] = None         # per part: the prompts built for the request (not saved)

    def result(self, receive: Receive) -> list[tuple[str, list[Task], list, dict]]:
        """(name, tasks, samples, generation metrics) per part, waiting for the engines the first time."""
        if self.received is None:
            self.received = receive([(n, len(t)) for n, t in self.parts], self.ticket, self.version)
            self.ticket = None
        return [(n, t, outs, m) for (n, t), (outs, m) in zip(self.parts, self.received)]


def draw_round(step: int, data, queue: AuxQueue, aux_tasks: Callable[[list, int], list[Task]],
               engine_version: int) -> Round:
    """Step `step`'s prompts: the queue's next reward batch first (the queue holds the groups recycled up to this
    step, which a new episode's start would clear; a synchronous step also trains on them before its successor
    starts the next episode), then the next infer batch."""
    aux = queue.pop_batch()
    episode, batch = data.next_batch()
    queue.start_episode(episode)
    parts = [("infer", [Task.from_example(episode, ex) for ex in batch])]
    if aux is not None:
        parts.append(("reward", aux_tasks(aux, step)))
    return Round(step, engine_version, episode, parts)


class InFlight:
    """The round in flight as a checkpoint part: saving waits for the engines (a collective of the training ranks)
    and stores its prompts and samples. (None without one: synchronous runs.)"""
    optional = True

    def __init__(self, max_staleness: int, receive: Receive):
        self.max_staleness, self.receive = max_staleness, receive
        self.round: Optional[Round] = None

    def take(self) -> Optional[Round]:
        r, self.round = self.round, None
        return r

    def state_dict(self) -> Optional[dict]:
        r = self.round
        if r is None:
            return None
        received = r.result(self.receive)
        return {"step": r.step, "version": r.version, "episode": r.episode,
                "parts": [(n, [asdict(t) | {"kind": t.kind.value} for t in tasks]) for n, tasks in r.parts],
                "received": [([[asdict(s) for s in g] for g in outs], m) for _, _, outs, m in received]}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None:
            self.round = None
            return
        if not self.max_staleness:  # its prompts are already drawn: they would be lost
            raise ValueError("config field 'algorithm.max_staleness': the checkpoint holds a round generated ahead "
                             "by a one-step off-policy run (max_staleness=1); resume it with max_staleness=1 (its "
                             "prompts were drawn from the data and the recycling queue already)")
        parts = [(n, [Task(**t) for t in tasks]) for n, tasks in state["parts"]]
        received = [([[Sample(**s) for s in g] for g in outs], m) for outs, m in state["received"]]
        self.round = Round(state["step"], state["version"], state["episode"], parts, None, received)
