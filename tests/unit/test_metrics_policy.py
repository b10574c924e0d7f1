"""Metrics files and plotting; token-budget micro-batching."""
import pytest

from megatron_spark.metrics import MetricsLogger, panels, plot, read_metrics, smooth
from megatron_spark.policy import Policy, Rollout


def test_jsonl_and_plot(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 4):
        log.log(step, {"infer/reward_mean": 0.1 * step, "reward/judge_accuracy": 0.5, "time/infer_rollout": 1.0})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["infer/reward_mean"] == pytest.approx(0.3)
    assert list((tmp_path / "tensorboard").glob("events.*"))
    png = plot(tmp_path)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="RUN_DIR must be a training run directory"):
        read_metrics(tmp_path / "nope")


def test_every_panel_of_a_trainer_run_has_data(tmp_path):
    """The keys the trainer logs (both periods' time split, held-out evaluations every 5 steps): a panel per curve
    group, the time split stacked by phase, no empty panel; smoothing is a trailing mean."""
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 21):
        m = {"infer/reward_mean": 0.5, "reward/reward_mean": 0.4, "reward/judge_accuracy": step % 2,
             "infer/kl": 0.01, "infer/clip_fraction": 0.1, "infer/response_len": 12.0,
             "time/infer_rollout": 1.0, "time/infer_reward": 0.1, "time/infer_logprobs": 0.5, "time/infer_train": 2.0,
             "time/infer_sync": 0.2, "time/reward_rollout": 1.0, "time/reward_train": 2.0, "time/step": 7.0}
        if step % 5 == 0:
            m.update({"eval/task_accuracy": 0.5, "eval/judge_accuracy": 0.6, "time/eval": 0.3})
        log.log(step, m)
    found = dict(panels(read_metrics(tmp_path)))
    assert set(found) == {"reward", "judge / reflection (training tasks)", "held-out (eval.file)",
                          "kl / clip fraction", "response length", "time per step by phase (s, stacked)"}
    assert all(pts for series in found.values() for pts in series.values())
    split = found["time per step by phase (s, stacked)"]
    assert set(split) == {"rollout", "reward", "logprobs", "train", "sync", "eval"}
    assert dict(split["train"])[1] == 4.0 and dict(split["eval"]) == {5: 0.3, 10: 0.3, 15: 0.3, 20: 0.3}
    assert smooth([0, 1, 0, 1, 0, 1], 2) == [0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert plot(tmp_path).stat().st_size > 1000


def test_token_budget_micro_batches_keep_order():
    p = Policy([], None, 0, micro_batch_size=4, max_tokens_per_micro_batch=40)
    rs = [Rollout(list(range(n)), [1, 2], f"g{i}") for i, n in enumerate([8, 8, 8, 30, 5, 5])]
    parts = p._micro_batches(rs)
    assert [len(x) for x in parts] == [3, 1, 2]        # 3 x 10 tokens fit in 40; 32 alone; then 2 x 7
    assert [r for part in parts for r in part] == rs
    assert all(max(len(r.prompt_ids) + 2 for r in part) * len(part) <= 40 for part in parts)


def test_progress_in_a_log_file_is_one_plain_line_per_step(tmp_path, capsys):
    """In a non-interactive log (a SLURM .out file, a pipe: stderr is not a terminal here) the progress bar is one
    plain line per step, no carriage-return animation."""
    from megatron_spark.metrics import LineProgress, MetricsLogger

    bar = MetricsLogger(tmp_path, True, tensorboard=False, progress_bar=True).progress(0, 3, "SPARK", unit="step")
    assert isinstance(bar, LineProgress)
    for r in (0.25, 0.5):
        bar.update(1)
        bar.set_postfix(reward=f"{r:.2f}")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and [x.split(" ")[:2] for x in err.splitlines()] == [["SPARK", "1/3"], ["SPARK", "2/3"]]
    assert err.splitlines()[1].endswith("reward=0.50")
