"""Metrics: one JSON line per step (always), TensorBoard and W&B when configured, and PNG curves."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None, resume: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional on clusters
                self.tb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir), resume="allow")

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


PLOTS = [("reward", ["infer/reward_mean", "reward/reward_mean"]),
         ("judge / reflection", ["reward/judge_accuracy", "reward/reflection_success"]),
         ("kl", ["infer/kl", "reward/kl"]), ("clip fraction", ["infer/clip_fraction", "reward/clip_fraction"]),
         ("response length", ["infer/response_len", "reward/response_len"]),
         ("time split (s)", ["time/rollout", "time/reward", "time/train", "time/sync"])]


def plot(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, keys) in zip(axes.flat, PLOTS):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    return out
