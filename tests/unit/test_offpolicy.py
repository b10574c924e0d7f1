"""One-step off-policy bookkeeping without a model: what a round draws, and what a checkpoint of it refuses.

The trainer's `_submit_round` and `InFlight` are exercised on a trainer object built without its stack (no
Megatron, no vLLM): the data stream, the recycling queue and the engines' request are stand-ins that record what
they were asked. The end-to-end behaviour (lag, resume, preemption) is tested in tests/e2e/test_disaggregated.py.
"""
from types import SimpleNamespace

import pytest

from megatron_spark.config import load_config
from megatron_spark.recycle import AuxQueue, AuxTask, RecycleSettings
from megatron_spark.trainer import InFlight, SparkTrainer


class Stream:
    """Batches of two examples; a new episode every `per_episode` batches."""

    def __init__(self, per_episode: int):
        self.per_episode, self.drawn = per_episode, 0

    def next_batch(self):
        k, self.drawn = self.drawn, self.drawn + 1
        ex = [SimpleNamespace(index=2 * k + i, messages=[{"role": "user", "content": f"q{2 * k + i}"}], answer="1",
                              image=None, question=f"q{2 * k + i}") for i in range(2)]
        return k // self.per_episode, ex


def trainer(per_episode: int, reward_batch: int, staleness: int = 1) -> SparkTrainer:
    t = SparkTrainer.__new__(SparkTrainer)
    t.cfg = load_config(None, [f"algorithm.recycle.reward_batch_size={reward_batch}", "rollout.num_ranks=1",
                               "rollout.placement=disaggregated", f"algorithm.max_staleness={staleness}"])
    t.data, t.queue, t.prompts, t.engine_version = Stream(per_episode), AuxQueue(reward_batch), None, 0
    t.recycle_settings = RecycleSettings.from_config(t.cfg.algorithm.recycle)
    t.requests = []
    t.request = lambda parts, step, overrides=None: t.requests.append([(n, len(ts)) for n, ts, _, _ in parts]) or 7
    return t


def aux(i: int) -> AuxTask:
    return AuxTask("pointwise", f"judge {i}", "Yes", None, f"p{i}", True)


def test_a_round_takes_the_recycled_batch_before_a_new_episode_clears_the_queue():
    """The groups recycled in the last step of an episode are trained (in the next round), as in a synchronous
    run, not cleared by the next episode's start."""
    t = trainer(per_episode=1, reward_batch=2)
    first = t._submit_round(0)  # episode 0; nothing recycled yet
    assert [n for n, _ in first.parts] == ["infer"] and t.queue.episode == 0
    t.queue.push([aux(0), aux(1), aux(2)])  # step 0 recycles its groups
    second = t._submit_round(1)  # episode 1 starts with this round
    assert [n for n, _ in second.parts] == ["infer", "reward"]
    assert [task.question for task in second.parts[1][1]] == ["judge 0", "judge 1"]
    assert t.queue.episode == 1 and len(t.queue) == 0  # the leftover of episode 0 is cleared, as SPARK does
    assert t.requests == [[("infer", 2)], [("infer", 2), ("reward", 2)]]
    assert (second.step, second.version, second.episode, second.ticket) == (1, 0, 1, 7)


def test_a_saved_round_is_refused_by_a_synchronous_resume():
    """A checkpoint with a round in flight resumed with max_staleness=0 would lose its prompts (drawn from the
    data and the queue already): a clear error naming the field; a checkpoint without one loads as None."""
    t = trainer(per_episode=4, reward_batch=2, staleness=0)
    t.inflight = "stale"
    InFlight(t).load_state_dict(None)
    assert t.inflight is None
    state = {"step": 3, "version": 2, "episode": 0, "parts": [("infer", [])], "received": [([], {})]}
    with pytest.raises(ValueError, match="algorithm.max_staleness.*resume it with max_staleness=1"):
        InFlight(t).load_state_dict(state)
    t = trainer(per_episode=4, reward_batch=2, staleness=1)
    InFlight(t).load_state_dict(state)
    assert (t.inflight.step, t.inflight.version, t.inflight.received) == (3, 2, [([], {})])
    assert InFlight.optional  # (checkpoints older than the part: CheckpointManager loads None)
