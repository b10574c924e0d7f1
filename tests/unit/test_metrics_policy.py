"""Metrics files and plotting; token-budget micro-batching."""
import pytest

from megatron_spark.metrics import MetricsLogger, plot, read_metrics
from megatron_spark.policy import Policy, Rollout


def test_jsonl_and_plot(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 4):
        log.log(step, {"infer/reward_mean": 0.1 * step, "reward/judge_accuracy": 0.5, "time/rollout": 1.0})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["infer/reward_mean"] == pytest.approx(0.3)
    assert list((tmp_path / "tensorboard").glob("events.*"))
    png = plot(tmp_path)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="RUN_DIR must be a training run directory"):
        read_metrics(tmp_path / "nope")


def test_token_budget_micro_batches_keep_order():
    p = Policy([], None, 0, micro_batch_size=4, max_tokens_per_micro_batch=40)
    rs = [Rollout(list(range(n)), [1, 2], f"g{i}") for i, n in enumerate([8, 8, 8, 30, 5, 5])]
    parts = p._micro_batches(rs)
    assert [len(x) for x in parts] == [3, 1, 2]        # 3 x 10 tokens fit in 40; 32 alone; then 2 x 7
    assert [r for part in parts for r in part] == rs
    assert all(max(len(r.prompt_ids) + 2 for r in part) * len(part) <= 40 for part in parts)
