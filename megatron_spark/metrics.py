"""Metrics: one JSON line per step (always), TensorBoard and W&B when configured, and PNG curves."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional


class LineProgress:
    """tqdm's interface (update, set_postfix, close) as one line per update: `SPARK 12/60 3.1s/step reward=0.41`."""

    def __init__(self, start: int, total: int, desc: str, unit: str):
        self.n, self.total, self.desc, self.unit = start, total, desc, unit
        self.postfix: dict = {}
        self.last = time.time()
        self.pending = False

    def update(self, k: int = 1) -> None:
        self._flush()
        self.n += k
        self.pending = True
        self.seconds, self.last = time.time() - self.last, time.time()

    def set_postfix(self, **kw) -> None:
        self.postfix = kw
        self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        import sys

        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc} {self.n}/{self.total} {self.seconds:.1f}s/{self.unit} {extra}".rstrip(), file=sys.stderr,
              flush=True)
        self.pending = False

    def close(self) -> None:
        self._flush()


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    @classmethod
    def from_config(cls, logging_cfg, enabled: bool, config: Optional[dict] = None,
                    resume: bool = False) -> "MetricsLogger":
        """The `logging` section's run directory, sinks and progress bar; `enabled` on the one rank that writes."""
        return cls(logging_cfg.dir, enabled, logging_cfg.tensorboard, logging_cfg.wandb_project, config, resume,
                   progress_bar=logging_cfg.progress_bar, sample_interval=logging_cfg.sample_interval)

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None, resume: bool = False,
                 progress_bar: bool = False, sample_interval: int = 0):
        self.enabled, self.progress_bar, self.sample_interval = enabled, progress_bar, sample_interval
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for p in (self.path, self.samples_path):
                if p.exists():
                    p.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional on clusters
                self.tb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir), resume="allow")

    def progress(self, start: int, total: int, desc: str, unit: str = "it"):
        """The progress display on the rank that writes when `logging.progress_bar` is on, else None: a bar (tqdm)
        on a terminal; in a non-interactive log (a SLURM .out file, a pipe) one plain line per update instead of
        carriage-return animation."""
        if not (self.enabled and self.progress_bar):
            return None
        import sys

        if not sys.stderr.isatty():
            return LineProgress(start, total, desc, unit)
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True)

    def resume_at(self, step: int) -> None:
        """A run resumed from the checkpoint of `step`: the lines of later steps (written before a crash or a
        preemption, then redone) are dropped, so each step's metrics appear exactly once. Atomic."""
        if not self.enabled:
            return
        for path in (self.path, self.samples_path):  # (both are appended to step by step)
            if not path.exists():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:  # (a line torn by the crash that led here is dropped)
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:
                    continue
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, path)

    def samples(self, step: int, period: str, kinds: list[str], prompts: list[str], answers: list[str],
                responses: list[list[str]], rewards: list[float]) -> None:
        """Every `logging.sample_interval` steps: one line per task of the period in samples.jsonl (its kind, the
        end of its prompt, its gold answer, its sampled responses and their rewards), to read what the model says."""
        if not (self.enabled and self.sample_interval) or step % self.sample_interval:
            return
        k = 0
        with open(self.samples_path, "a") as f:
            for kind, prompt, answer, texts in zip(kinds, prompts, answers, responses):
                f.write(json.dumps({"step": step, "period": period, "kind": kind, "prompt": prompt[-400:],
                                    "answer": answer, "responses": texts, "rewards": rewards[k:k + len(texts)]})
                        + "\n")
                k += len(texts)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"'{path}' not found: RUN_DIR must be a training run directory (logging.dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CURVES = [("reward", ["infer/reward_mean", "reward/reward_mean"]),
          ("judge / reflection (training tasks)", ["reward/judge_accuracy", "reward/reflection_success"]),
          ("held-out (eval.file)", ["eval/task_accuracy", "eval/judge_accuracy"]),
          ("kl / clip fraction", ["infer/kl", "reward/kl", "infer/clip_fraction", "reward/clip_fraction"]),
          ("response length", ["infer/response_len", "reward/response_len"])]
PHASES = ("rollout", "reward", "logprobs", "train", "sync", "eval")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (per-step curves of a small run are mostly noise)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def panels(rows: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {series: [(step, value)]}) for every panel that has data: the curves above, and the time of a step
    split by phase (both periods summed; `time/eval` when held-out evaluation ran)."""
    out = []
    for title, keys in CURVES:
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            out.append((title, series))
    split = {}
    for phase in PHASES:
        keys = [f"time/infer_{phase}", f"time/reward_{phase}"] if phase != "eval" else ["time/eval"]
        pts = [(r["step"], sum(r.get(k, 0.0) for k in keys)) for r in rows if any(k in r for k in keys)]
        if pts and any(v for _, v in pts):
            split[phase] = pts
    if split:
        out.append(("time per step by phase (s, stacked)", split))
    return out


def plot(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    found = panels(rows)
    if not found:
        raise ValueError(f"'{run_dir}/metrics.jsonl' holds no plottable metrics yet")
    cols = 3
    fig, axes = plt.subplots(-(-len(found) // cols), cols, figsize=(14, 3.6 * -(-len(found) // cols)), squeeze=False)
    window = max(1, len(rows) // 10)
    for ax, (title, series) in zip(axes.flat, found):
        if title.startswith("time per step"):
            steps = sorted({s for pts in series.values() for s, _ in pts})
            stacks = [[dict(pts).get(s, 0.0) for s in steps] for pts in series.values()]
            ax.stackplot(steps, *stacks, labels=list(series), alpha=0.8)
        else:
            for k, pts in series.items():
                xs, ys = zip(*pts)
                marker = "o" if k.startswith("eval/") else "."
                line = ax.plot(xs, ys, marker, alpha=0.35 if window > 1 and not k.startswith("eval/") else 0.9,
                               markersize=4)[0]
                if window > 1 and not k.startswith("eval/"):
                    ax.plot(xs, smooth(list(ys), window), color=line.get_color(), label=f"{k} (mean of {window})")
                else:
                    ax.plot(xs, ys, color=line.get_color(), label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
