"""The period's metrics, computed by hand for a small case (megatron_spark/period_metrics.py)."""
from types import SimpleNamespace

import pytest

from megatron_spark.period_metrics import PhaseTimes, RankWork, period_metrics


def sample(n_tokens: int, prompt: int = 3, finish: str = "stop", text: str = "x"):
    return SimpleNamespace(token_ids=[0] * n_tokens, prompt_token_ids=[0] * prompt, finish_reason=finish, text=text)


def test_a_small_period_by_hand():
    outs = [[sample(2), sample(4, finish="length")], [sample(6), sample(8)]]
    rewards = [1.0, 0.0, 1.0, 1.0]
    train = [{"policy_loss": 0.5, "update_skipped": 0}, {"policy_loss": float("nan"), "update_skipped": 1}]
    m = period_metrics("infer", ["math", "pointwise"], ["4", "Yes"], outs, rewards, rewards, drift=1e-6,
                       prompt_mismatches=0, train_metrics=train,
                       replica_work=[RankWork(3, 60, 80), RankWork(1, 20, 20)], gen_metrics={"infer/refills": 0},
                       times=PhaseTimes(rollout=1, reward=2, logprobs=3, train=4, sync=5))
    assert m["infer/reward_mean"] == 0.75 and "infer/shaped_reward_mean" not in m
    assert m["infer/truncated_fraction"] == 0.25 and m["infer/response_len"] == 5.0
    assert m["infer/tokens"] == 4 * 3 + 20
    assert m["infer/optimizer_steps"] == 1 and m["infer/updates_skipped_nonfinite"] == 1
    assert m["infer/policy_loss"] == 0.5          # the skipped update's NaN is left out of the mean
    assert m["infer/update_skipped"] == 0.5       # ... and counted over all updates
    assert m["infer/logprob_samples_min"] == 1 and m["infer/logprob_samples_max"] == 3
    assert m["infer/real_token_fraction"] == pytest.approx(80 / 100)
    assert m["infer/judge_accuracy"] == 1.0 and "infer/reflection_success" not in m
    assert {m[f"time/infer_{k}"] for k in ("rollout", "reward", "logprobs", "train", "sync")} == {1, 2, 3, 4, 5}
    assert m["infer/refills"] == 0


def test_shaped_rewards_get_their_own_mean():
    outs = [[sample(2), sample(2)]]
    m = period_metrics("infer", ["math"], ["1"], outs, [1.0, 0.0], [0.5, 0.0], 0.0, 0, [], [RankWork(2, 1, 1)], {},
                       PhaseTimes(0, 0, 0, 0, 0))
    assert m["infer/reward_mean"] == 0.5 and m["infer/shaped_reward_mean"] == 0.25


def test_version_lag_of_the_trained_samples():
    """Samples stamped with the policy version that generated them: the lag to the version the update starts from
    (one-step off-policy: 1); no stamp, no lag keys."""
    outs = [[sample(2), sample(2)], [sample(2), sample(2)]]
    for s, v in zip([s for g in outs for s in g], (3, 3, 2, 3)):
        s.version, s.updates = v, 10 * v
    m = period_metrics("reward", ["math", "math"], ["1", "2"], outs, [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0],
                       0.0, 0, [], [RankWork(4, 1, 1)], {}, PhaseTimes(0, 0, 0, 0, 0), trained_at=4, updates_at=42)
    assert (m["reward/version_lag_min"], m["reward/version_lag_max"], m["reward/version_lag_mean"]) == (1, 2, 1.25)
    assert (m["reward/updates_behind_max"], m["reward/updates_behind_mean"]) == (22, 14.5)
    plain = period_metrics("infer", ["math"], ["1"], [[sample(2), sample(2)]], [1.0, 0.0], [1.0, 0.0], 0.0, 0, [],
                           [RankWork(2, 1, 1)], {}, PhaseTimes(0, 0, 0, 0, 0))
    assert not any("version_lag" in k for k in plain)
