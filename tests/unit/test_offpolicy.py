"""One-step off-policy bookkeeping without a model: what a round draws, and what a checkpoint of it refuses.

`offpolicy.draw_round` and `offpolicy.InFlight` are called directly with stand-ins for the data stream (the
recycling queue is the real one). The end-to-end behaviour (lag, resume, preemption) is tested in
tests/e2e/test_disaggregated.py.
"""
from types import SimpleNamespace

import pytest

from megatron_spark.kinds import TaskKind
from megatron_spark.offpolicy import InFlight, draw_round
from megatron_spark.recycle import AuxQueue, AuxTask
from megatron_spark.samples import Task


class Stream:
    """Batches of two examples; a new episode every `per_episode` batches."""

    def __init__(self, per_episode: int):
        self.per_episode, self.drawn = per_episode, 0

    def next_batch(self):
        k, self.drawn = self.drawn, self.drawn + 1
        ex = [SimpleNamespace(index=2 * k + i, messages=[{"role": "user", "content": f"q{2 * k + i}"}], answer="1",
                              image=None, question=f"q{2 * k + i}") for i in range(2)]
        return k // self.per_episode, ex


def aux_tasks(aux: list, step: int) -> list[Task]:
    return [Task.from_aux(f"s{step}-{i}", t, 1024) for i, t in enumerate(aux)]


def aux(i: int) -> AuxTask:
    return AuxTask(TaskKind.POINTWISE, f"judge {i}", "Yes", None, f"p{i}", True)


def test_a_round_takes_the_recycled_batch_before_a_new_episode_clears_the_queue():
    """The groups recycled in the last step of an episode are trained (in the next round), as in a synchronous
    run, not cleared by the next episode's start."""
    data, queue = Stream(per_episode=1), AuxQueue(2)
    first = draw_round(0, data, queue, aux_tasks, engine_version=0)  # episode 0; nothing recycled yet
    assert [n for n, _ in first.parts] == ["infer"] and queue.episode == 0
    queue.push([aux(0), aux(1), aux(2)])  # step 0 recycles its groups
    second = draw_round(1, data, queue, aux_tasks, engine_version=0)  # episode 1 starts with this round
    assert [n for n, _ in second.parts] == ["infer", "reward"]
    assert [task.question for task in second.parts[1][1]] == ["judge 0", "judge 1"]
    assert queue.episode == 1 and len(queue) == 0  # the leftover of episode 0 is cleared, as SPARK does
    assert [[(n, len(ts)) for n, ts in r.parts] for r in (first, second)] == [[("infer", 2)],
                                                                              [("infer", 2), ("reward", 2)]]
    assert (second.step, second.version, second.episode) == (1, 0, 1)


def test_a_saved_round_is_refused_by_a_synchronous_resume():
    """A checkpoint with a round in flight resumed with max_staleness=0 would lose its prompts (drawn from the
    data and the queue already): a clear error naming the field; a checkpoint without one loads as None."""
    slot = InFlight(max_staleness=0, receive=None)
    slot.round = "stale"
    slot.load_state_dict(None)
    assert slot.round is None
    state = {"step": 3, "version": 2, "episode": 0, "parts": [("infer", [])], "received": [([], {})]}
    with pytest.raises(ValueError, match="algorithm.max_staleness.*resume it with max_staleness=1"):
        slot.load_state_dict(state)
    slot = InFlight(max_staleness=1, receive=None)
    slot.load_state_dict(state)
    assert (slot.round.step, slot.round.version, slot.round.received) == (3, 2, [([], {})])
    assert InFlight.optional  # (checkpoints older than the part: CheckpointManager loads None)
