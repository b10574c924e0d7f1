"""slurm/train.sbatch on a real single-node SLURM (started by `make test`): a preemption signal mid-run makes the
job checkpoint, requeue itself and resume to the end."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def slurm_ready() -> bool:
    if shutil.which("sbatch") is None:
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return p.returncode == 0 and any(s in p.stdout for s in ("idle", "mix", "alloc"))


pytestmark = pytest.mark.skipif(not slurm_ready(), reason="no running SLURM (make test starts one)")


def job_state(job: str) -> str:
    """The job's state; GONE once slurmctld no longer knows it. A busy slurmctld (both cores training) can fail a
    query: retry rather than mistake that for a finished job."""
    for _ in range(10):
        p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
        for tok in p.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        if "Invalid job id" in p.stderr:
            return "GONE"
        time.sleep(1)
    return "UNKNOWN"


def release_requeued(job: str) -> None:
    """SLURM holds a requeued job back for a while (BeginTime); the tests are about requeue and resume, not the
    wait, so bring the start forward when that is the only reason it pends. Never to the second of the requeue:
    slurmd revokes the old allocation's credential at that second, and a launch in the same second dies with "Job
    credential revoked" (seen in CI). Two seconds out, and only once (a later call finds the begin time near)."""
    import datetime

    p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    if "JobState=PENDING" not in p.stdout or "Reason=BeginTime" not in p.stdout:
        return
    begin = next((tok.split("=", 1)[1] for tok in p.stdout.split() if tok.startswith("EligibleTime=")), "")
    try:
        wait = (datetime.datetime.fromisoformat(begin) - datetime.datetime.now()).total_seconds()
    except ValueError:
        return
    if wait > 5:
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], capture_output=True)


def slurm_story(job: str) -> str:
    """What slurmctld said about the job: the reason a requeued job never came back is there, not in its log."""
    try:
        lines = Path("/var/log/slurm/slurmctld.log").read_text().splitlines()
    except OSError:
        return "(no slurmctld log)"
    return "\n".join(line for line in lines if f"JobId={job} " in line + " " or f"JobId={job}_" in line)[-3000:]


def two_nodes_ready(idle_within_s: float = 0.0) -> bool:
    """Both nodes of the `multi` partition are up (with `idle_within_s`: and idle, waiting that long for a previous
    job's node to finish cleaning up)."""
    if shutil.which("sinfo") is None:
        return False
    deadline = time.time() + idle_within_s
    while True:
        p = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%t"], capture_output=True, text=True)
        states = [s.strip() for s in p.stdout.splitlines()] if p.returncode == 0 else []
        if idle_within_s <= 0:
            return sum(s in ("idle", "mix", "alloc") for s in states) >= 2
        if sum(s == "idle" for s in states) >= 2:
            return True
        if time.time() > deadline:
            return False
        time.sleep(1)


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    """One node, two ranks (TP=2 trainer and a TP=2 engine in the same two processes)."""
    preempt_and_resume(tmp_path, ["--nodes=1"], ranks_per_node=2)


@pytest.mark.skipif(not two_nodes_ready(), reason="no two-node partition (scripts/slurm_up.sh makes one where "
                                                  "network namespaces are allowed)")
def test_two_node_job_trains_across_nodes_is_preempted_and_resumes(tmp_path):
    """Two nodes (each its own network namespace, address and hostname), one rank each: the trainer's TP group and
    the TP=2 rollout engine span both nodes, rendezvous goes through the first node's address, the checkpoint
    directory is shared; a preemption signal mid-run checkpoints, requeues and resumes on both nodes."""
    log = preempt_and_resume(tmp_path, ["--partition=multi", "--nodes=2"], ranks_per_node=1)
    assert "2 node(s) x 1 processes, master spark-n1:" in log, log[-3000:]


def test_a_crashed_job_is_requeued_and_resumes(tmp_path):
    """A crash (rank 1 SIGKILLed at step 3, no torchrun restarts left in the allocation: SPARK_MAX_RESTARTS=0):
    slurm/train.sbatch requeues the job as failure 1 of SPARK_MAX_REQUEUES (3), the new allocation resumes from the
    step-2 checkpoint and finishes; each step's metrics once."""
    log = preempt_and_resume(tmp_path, ["--nodes=1"], ranks_per_node=2, crash_at_step=3)
    assert "failed (exit" in log and "requeue 1 of 3" in log, log[-3000:]
    assert "resumed from" in log and "(step 2)" in log, log[-3000:]
    assert not list(tmp_path.glob(".spark-failures-*")), "the failure count outlived the job that finished"


def preempt_and_resume(tmp_path, sbatch_args: list[str], ranks_per_node: int,
                       crash_at_step: Optional[int] = None) -> str:
    """A training job that is preempted after its first checkpoint (or, with `crash_at_step`, loses rank 1 there
    in its first allocation) and must still end at step 5 with every step logged once."""
    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    hf = build_qwen2_5_vl(tmp_path / "model", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(tmp_path / "data", 64, seed=0)
    run_dir, ck = tmp_path / "run", tmp_path / "ckpt"
    overrides = [f"model.hf_dir={hf}", f"data.train_file={train}", f"logging.dir={run_dir}", f"checkpoint.dir={ck}",
                 "data.rollout_batch_size=4", "training.global_batch_size=8", "training.micro_batch_size=4",
                 "rollout.max_new_tokens=12", "algorithm.recycle.reward_batch_size=4", "training.max_steps=5",
                 "checkpoint.save_interval=2", "logging.progress_bar=false",
                 f"algorithm.recycle.templates_file={ROOT / 'examples' / 'templates' / 'tiny.yaml'}"]
    env = {"GPUS_PER_NODE": str(ranks_per_node), "SPARK_PYTHON": sys.executable}
    if crash_at_step is not None:  # (attempt 0: the first allocation's first torchrun attempt only)
        env.update(SPARK_MAX_RESTARTS="0", SPARK_TEST_FAULTS=json.dumps({"kill": [0, crash_at_step, 1]}))
    import os

    job = subprocess.run(["sbatch", "--parsable", *sbatch_args, f"--cpus-per-task={os.cpu_count()}",
                          "--gpus-per-node=0",
                          str(ROOT / "slurm" / "train.sbatch"), str(ROOT / "examples" / "tiny_cpu.yaml"),
                          *overrides], cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    out = tmp_path / f"spark-{job}.out"
    try:
        # after the step-2 checkpoint: megatron-core's writer Manager then exists and SIGUSR1 reaches it too (its
        # default action would kill it and fail the checkpoint the signal asks for)
        deadline = time.time() + 300
        tracker = ck / "latest_checkpointed_iteration.txt"
        while time.time() < deadline and not tracker.is_file():
            assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING", "UNKNOWN"), out.read_text()[-3000:]
            time.sleep(1)
        if crash_at_step is None:
            subprocess.run(["scancel", "--signal=USR1", job], check=True)   # what SLURM does before a time limit
        deadline = time.time() + 600
        while time.time() < deadline:
            tracker = ck / "latest_checkpointed_iteration.txt"
            if tracker.is_file() and tracker.read_text().strip() == "5" and job_state(job) in ("COMPLETED", "GONE"):
                break
            release_requeued(job)
            time.sleep(2)
    finally:
        if job_state(job) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"):
            subprocess.run(["scancel", job])
    log = out.read_text()
    assert crash_at_step is not None or "requeueing job" in log, log[-4000:]
    assert "resumed from" in log, log[-4000:] + slurm_story(job)
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "5", log[-4000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
    assert steps[-1] == 5 and sorted(set(steps)) == [1, 2, 3, 4, 5], steps
    return log


def test_eval_job_stops_requeues_and_finishes_every_item_once(tmp_path):
    """slurm/eval.sbatch: a USR1 (the time-limit warning) mid-file stops the evaluation and requeues the job; the
    requeued job evaluates only what is left."""
    import json
    import os

    from megatron_spark.fixtures.shapes import make_shapes_benchmark
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    hf = build_qwen2_5_vl(tmp_path / "model", min_pixels=3136, max_pixels=3136)
    bench = make_shapes_benchmark(tmp_path / "bench", 24, seed=1)
    out = tmp_path / "eval"
    env = {"GPUS_PER_NODE": "1", "SPARK_PYTHON": sys.executable}
    job = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}", "--gpus-per-node=0",
                          str(ROOT / "slurm" / "eval.sbatch"), str(bench), "--model", str(hf), "--out", str(out),
                          "--max-tokens", "24", "--min-pixels", "3136", "--max-pixels", "3136", "--chunk-size", "2"],
                         cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    log = tmp_path / f"spark-eval-{job}.out"
    results = out / "results.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (results.is_file() and results.read_text().count("\n") >= 2):
            assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING", "UNKNOWN"), \
                log.read_text()[-3000:] if log.exists() else "no log"
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        deadline = time.time() + 400
        while time.time() < deadline and not ((out / "metrics.json").is_file() and
                                              job_state(job) in ("COMPLETED", "GONE")):
            release_requeued(job)
            time.sleep(1)
    finally:
        if job_state(job) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"):
            subprocess.run(["scancel", job])
    text = log.read_text()
    assert "stop requested" in text and text.count("megatron-spark eval") == 2, text[-4000:] + slurm_story(job)
    ids = [json.loads(x)["id"] for x in results.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24, text[-3000:]
    assert json.loads((out / "metrics.json").read_text())["plain"]["items"] == 24


def test_sweep_array_job_records_every_layout_and_reports(tmp_path):
    """`megatron-spark sweep GRID --slurm`: one array task per layout on the real SLURM; a layout the config
    refuses is recorded as invalid with the config's reason, the others as measured runs; the report has a row each."""
    import os

    import yaml

    from megatron_spark.fixtures.shapes import make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    hf = build_qwen2_5_vl(tmp_path / "model", min_pixels=3136, max_pixels=3136)
    train = make_shapes_task(tmp_path / "data", 16, seed=0)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "config": str(ROOT / "examples" / "tiny_cpu.yaml"), "nproc_per_node": 2, "steps": 1, "timeout_s": 400,
        "overrides": [f"model.hf_dir={hf}", f"data.train_file={train}", "data.rollout_batch_size=4",
                      "rollout.n_samples_per_prompt=2", "training.global_batch_size=8", "training.micro_batch_size=4",
                      "rollout.max_new_tokens=8", "algorithm.recycle.reward_batch_size=4",
                      f"algorithm.recycle.templates_file={ROOT / 'examples' / 'templates' / 'tiny.yaml'}"],
        # one measured layout (a grid over two keys) and one the config refuses: each run costs ~30 s of the suite
        "grid": {"parallel.tensor_model_parallel_size": [2], "rollout.tensor_parallel_size": [2]},
        "runs": [{"parallel.tensor_model_parallel_size": 3}]}))
    out = tmp_path / "sweep"
    # on the two-node partition where there is one: each task takes a whole node, so the two run side by side
    partition = " --partition=multi" if two_nodes_ready(idle_within_s=120) else ""
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "sweep", str(grid), "--out", str(out), "--slurm",
                        "--wait", f"--sbatch-args=--cpus-per-task={os.cpu_count()} --gpus-per-node=0{partition}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hosts = {line.rsplit(" on ", 1)[1] for f in out.glob("spark-sweep-*.out") for line in f.read_text().splitlines()
             if line.startswith("sweep task ")}
    assert hosts == ({"spark-n1", "spark-n2"} if partition else {os.uname().nodename}), hosts
    rows = [json.loads((out / f"run_{i:03d}" / "result.json").read_text()) for i in range(2)]
    assert [r["status"] for r in rows] == ["ok", "invalid"], [(r["status"], r.get("reason")) for r in rows]
    assert "parallel.tensor_model_parallel_size" in rows[1]["reason"] and \
        "TP 3: the model has 2 KV heads" in rows[1]["reason"]
    assert rows[0]["overrides"] == ["parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=2"]
    for r in rows[:1]:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0.1
        assert {"infer_rollout", "infer_train", "infer_sync"} <= set(r["split_s"])
        assert r["predicted"]["static_gib"] > 0
    report = (out / "report.md").read_text()
    table_rows = [x for x in report.splitlines() if x.startswith("| ")][1:]  # after the header
    assert len(table_rows) == 2 and "| invalid |" in report and (out / "report.png").stat().st_size > 1000


@pytest.mark.skipif(not two_nodes_ready(), reason="no two-node partition (scripts/slurm_up.sh makes one where "
                                                  "network namespaces are allowed)")
def test_eval_job_on_two_nodes_splits_the_items_and_reports_once(tmp_path):
    """slurm/eval.sbatch with --nodes=2: each node evaluates its own part (its results file), every item exactly
    once, then one report over both parts."""
    import json
    import os

    from megatron_spark.fixtures.shapes import make_shapes_benchmark
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    hf = build_qwen2_5_vl(tmp_path / "model", min_pixels=3136, max_pixels=3136)
    bench = make_shapes_benchmark(tmp_path / "bench", 12, seed=2)
    out = tmp_path / "eval"
    env = {"GPUS_PER_NODE": "1", "SPARK_PYTHON": sys.executable}
    job = subprocess.run(["sbatch", "--parsable", "--partition=multi", "--nodes=2", f"--cpus-per-task={os.cpu_count()}",
                          "--gpus-per-node=0", str(ROOT / "slurm" / "eval.sbatch"), str(bench), "--model", str(hf),
                          "--out", str(out), "--max-tokens", "16", "--min-pixels", "3136", "--max-pixels", "3136",
                          "--chunk-size", "4"], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.strip().split(";")[0]
    log = tmp_path / f"spark-eval-{job}.out"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and job_state(job) not in ("COMPLETED", "FAILED", "GONE", "CANCELLED"):
            time.sleep(1)
    finally:
        if job_state(job) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"):
            subprocess.run(["scancel", job])
    text = log.read_text()
    assert "on 2 node(s)" in text and (out / "metrics.json").is_file(), text[-4000:] + slurm_story(job)
    parts = {p.name: [json.loads(x)["id"] for x in p.read_text().splitlines()] for p in out.glob("results*.jsonl")}
    assert sorted(parts) == ["results.part0.jsonl", "results.part1.jsonl"], parts
    ids = [i for v in parts.values() for i in v]
    assert len(ids) == len(set(ids)) == 12 and all(len(v) == 6 for v in parts.values()), parts
    assert json.loads((out / "metrics.json").read_text())["plain"]["items"] == 12
