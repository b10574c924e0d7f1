"""`make run`'s command with a short run: the output is for people (fewer than 60 lines, none of the libraries'
notices a user cannot act on), ends with the before/after table and the evaluation tables of `megatron-spark eval`."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_main_job_output_is_short_and_ends_with_the_results(tmp_path):
    run = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "demo", "--run-dir", str(run),
                        "training.max_steps=3", "training.sft_warmup_steps=2", "logging.progress_bar=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert len(lines) < 60, f"{len(lines)} lines:\n" + "\n".join(lines[:80])
    # what the quiet mode removed (each was measured in this output before): vLLM's start-up warnings, its and
    # transformers' progress bars, torch's NUMA and torchrun's OMP notices, megatron-core's overwrite warning
    noise = ["WARNING", "Triton is installed", "Warning: NUMA", "Loading safetensors", "Writing model shards",
             "OMP_NUM_THREADS", "FusedMMInputNorm", "Overwriting old incomplete", "Loading weights"]
    assert [x for x in lines if any(n in x for n in noise)] == []
    for row in ("task accuracy (greedy)", "judge accuracy (greedy)", "judge AUROC (votes)", "solved but misjudged"):
        assert row in p.stdout, row  # the before/after table
    assert "| **mean over datasets** |" in p.stdout and "| judge/pointwise |" in p.stdout  # eval's tables
    seen, repeated = set(), []
    for x in lines:  # vLLM's warnings: "(MainProcess pid=N) WARNING date time [file:line] message", once per process
        m = re.search(r"pid=(\d+)\) WARNING \S+ \S+ \[[^\]]+\] (.*)", x)
        if m:
            repeated += [x] if m.groups() in seen else []
            seen.add(m.groups())
    assert not repeated, repeated[:5]
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval_judge" / "metrics.json").is_file()
