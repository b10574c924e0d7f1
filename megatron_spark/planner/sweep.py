"""`megatron-spark sweep`: a grid of layouts / settings -> one short training run each -> a table and plots.

    megatron-spark sweep GRID.yaml --out DIR [--slurm [--wait]]      # run (locally, or as an sbatch --array)
    megatron-spark sweep report DIR                                  # DIR/report.md + DIR/report.png

GRID.yaml:
    config: examples/tiny_cpu.yaml         # the base training config
    nproc_per_node: 2                      # processes per run (torchrun)
    steps: 2                               # training.max_steps of each run
    timeout_s: 900                         # per run
    overrides: [model.hf_dir=..., data.train_file=...]            # every run
    grid: {parallel.tensor_model_parallel_size: [1, 2], rollout.tensor_parallel_size: [1, 2]}   # product
    runs: [{parallel.pipeline_model_parallel_size: 2}]             # extra single runs

Every run writes DIR/run_NNN/result.json: its overrides, status (ok | invalid | failed | timeout) and reason, the
median step time and its split by phase (the trainer's time/* metrics, first step excluded when there are more),
tokens/s, peak memory (GPU: the trainer's max_memory_allocated; CPU: the peak RSS of the run's processes) and the
planner's prediction for the same layout. A run that fails is recorded and the sweep goes on. The config is
validated before anything starts, so an impossible layout is `invalid` with the config's own message.
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def expand(grid_file: str | Path) -> dict:
    import yaml

    g = yaml.safe_load(Path(grid_file).read_text()) or {}
    for key in g:
        if key not in ("config", "nproc_per_node", "steps", "timeout_s", "overrides", "grid", "runs"):
            raise ValueError(f"{grid_file}: unknown key '{key}'; use config, nproc_per_node, steps, timeout_s, "
                             f"overrides, grid, runs")
    grid = g.get("grid") or {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"{grid_file}: grid.{k} must be a non-empty list of values")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    combos += [dict(r) for r in g.get("runs") or []]
    if not combos:
        raise ValueError(f"{grid_file}: no runs; give a grid and/or runs")
    base = g.get("config")
    if base and not Path(base).is_file():
        raise ValueError(f"{grid_file}: config '{base}' does not exist")
    return {"config": str(Path(base).resolve()) if base else None, "nproc_per_node": int(g.get("nproc_per_node", 1)),
            "steps": int(g.get("steps", 2)), "timeout_s": float(g.get("timeout_s", 1800)),
            "overrides": list(g.get("overrides") or []),
            "runs": [{"index": i, "overrides": [f"{k}={v}" for k, v in c.items()]} for i, c in enumerate(combos)]}


def prepare(grid_file: str | Path, out: str | Path) -> dict:
    plan = expand(grid_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def _predicted(cfg, world: int) -> Optional[dict]:
    """The planner's static memory (and its train-phase peak) for this run's model and layout."""
    try:
        from dataclasses import replace

        from megatron_spark.models.hf_config import load_hf_config
        from megatron_spark.planner.memory import GIB, plan_memory
        from megatron_spark.planner.search import from_config

        shape = load_hf_config(cfg.model.hf_dir)
        layout, work = from_config(cfg)
        layout = replace(layout, dp=max(1, world // (layout.tp * layout.pp)))
        mem = plan_memory(shape, layout, replace(work, attention="unfused" if cfg.model.dtype == "fp32" else "flash"))
        worst = max(mem, key=lambda m: m.train)
        return {"static_gib": max(m.static for m in mem) / GIB, "train_peak_gib": worst.train / GIB}
    except Exception as e:  # noqa: BLE001 - a prediction is a nice-to-have next to the measurement
        return {"error": str(e)[:200]}


def run_one(out: str | Path, index: int) -> dict:
    out = Path(out)
    plan = json.loads((out / "sweep.json").read_text())
    run = plan["runs"][index]
    rdir = out / f"run_{index:03d}"
    rdir.mkdir(exist_ok=True)
    overrides = plan["overrides"] + run["overrides"] + [f"training.max_steps={plan['steps']}",
                                                        f"logging.dir={rdir}", "logging.progress_bar=false",
                                                        "logging.tensorboard=false"]
    result = {"index": index, "overrides": run["overrides"], "nproc": plan["nproc_per_node"]}
    from megatron_spark.config import load_config

    try:
        from megatron_spark.config import validate_for_launch

        cfg = load_config(plan["config"], overrides)
        validate_for_launch(cfg, plan["nproc_per_node"])  # the layout against the real model, as the trainer does
    except ValueError as e:
        result.update(status="invalid", reason=str(e))
        return _write(rdir, result)
    result["predicted"] = _predicted(cfg, plan["nproc_per_node"])
    from megatron_spark.launch import torchrun_command

    cmd = torchrun_command(plan["nproc_per_node"], ["-m", "megatron_spark.train"] + (
        ["--config", plan["config"]] if plan["config"] else []) + overrides)
    t0 = time.time()
    log = open(rdir / "train.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=plan["timeout_s"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
    log.close()
    result["seconds"] = round(time.time() - t0, 1)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    tail = (rdir / "train.log").read_text()[-20000:]
    if rc is None:
        result.update(status="timeout", reason=f"no result within {plan['timeout_s']:.0f} s")
    elif rc != 0:
        oom = "out of memory" in tail.lower() or "outofmemory" in tail.lower()
        lines = [x for x in tail.splitlines() if "Error" in x or "error:" in x]
        result.update(status="failed", reason="OOM" if oom else (lines[-1][-300:] if lines else f"exit {rc}"))
    else:
        result.update(status="ok", **_measure(rdir / "metrics.jsonl"))
    return _write(rdir, result)


def _measure(metrics_file: Path) -> dict:
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    steady = rows[1:] if len(rows) > 1 else rows  # the first step pays one-time costs
    step = statistics.median(r["time/step"] for r in steady)
    split = {k[5:]: statistics.median(r.get(k, 0.0) for r in steady) for k in sorted(steady[0])
             if k.startswith("time/") and k != "time/step" and "engine_rollout" not in k}
    tokens = statistics.median(sum(v for k, v in r.items() if k.endswith("/tokens")) for r in steady)
    out = {"steps": len(rows), "step_s": step, "split_s": split, "tokens_per_s": tokens / step if step else None}
    mem = [r["memory/max_allocated_gib"] for r in rows if "memory/max_allocated_gib" in r]
    if mem:
        out["gpu_peak_gib"] = max(mem)
    return out


def _write(rdir: Path, result: dict) -> dict:
    tmp = rdir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, rdir / "result.json")
    return result


def run_local(out: str | Path) -> list[dict]:
    """Each run in its own `sweep run-one` process, as an array task would (and so that the peak RSS of a run's
    processes is its own)."""
    plan = json.loads((Path(out) / "sweep.json").read_text())
    results = []
    for r in plan["runs"]:
        subprocess.run([sys.executable, "-m", "megatron_spark.cli", "sweep", "run-one", str(out), str(r["index"])],
                       cwd=ROOT, check=False)
        f = Path(out) / f"run_{r['index']:03d}" / "result.json"
        res = json.loads(f.read_text()) if f.is_file() else {"status": "failed", "reason": "the run-one process died"}
        print(f"[{r['index'] + 1}/{len(plan['runs'])}] {' '.join(r['overrides'])}: {res['status']}"
              + (f" ({res.get('reason')})" if res["status"] != "ok" else f", {res['step_s']:.1f} s/step"), flush=True)
        results.append(res)
    return results


def submit(out: str | Path, extra: Optional[list[str]] = None) -> str:
    """One array task per run (`slurm/sweep.sbatch`); returns the job id."""
    plan = json.loads((Path(out) / "sweep.json").read_text())
    n = len(plan["runs"])
    cmd = ["sbatch", "--parsable", f"--array=0-{n - 1}", *(extra or []), str(ROOT / "slurm" / "sweep.sbatch"),
           str(Path(out).resolve())]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SPARK_PYTHON": sys.executable},
                       cwd=Path(out))
    if p.returncode:
        raise ValueError(f"sbatch failed: {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


def results(out: str | Path) -> list[dict]:
    plan = json.loads((Path(out) / "sweep.json").read_text())
    got = []
    for r in plan["runs"]:
        f = Path(out) / f"run_{r['index']:03d}" / "result.json"
        got.append(json.loads(f.read_text()) if f.is_file() else
                   {"index": r["index"], "overrides": r["overrides"], "status": "missing", "reason": "no result yet"})
    return got
