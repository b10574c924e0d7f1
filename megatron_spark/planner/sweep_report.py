"""`megatron-spark sweep report DIR`: one Markdown row per run (failed runs with their reason) and a PNG with
throughput per run and against the number of processes, and measured vs predicted memory."""
from __future__ import annotations

from pathlib import Path

from megatron_spark.planner.sweep import results


def _label(r: dict) -> str:
    short = {"parallel.tensor_model_parallel_size": "TP", "parallel.pipeline_model_parallel_size": "PP",
             "rollout.tensor_parallel_size": "rTP", "training.micro_batch_size": "mbs",
             "model.recompute_activations": "recompute"}
    parts = []
    for o in r["overrides"]:
        k, _, v = o.partition("=")
        parts.append(f"{short.get(k, k.split('.')[-1])}={v}")
    return " ".join(parts) or "base"


def markdown(rows: list[dict]) -> str:
    phases = sorted({k for r in rows for k in (r.get("split_s") or {})})
    head = ["#", "run", "status", "s/step", *[f"{p} s" for p in phases], "tokens/s", "peak memory GiB",
            "predicted static GiB", "reason"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r["status"] == "ok"
        mem = r.get("gpu_peak_gib") if r.get("gpu_peak_gib") is not None else r.get("peak_rss_gib")
        pred = (r.get("predicted") or {}).get("static_gib")
        cells = [str(r["index"]), _label(r), r["status"], f"{r['step_s']:.2f}" if ok else "-",
                 *[f"{r['split_s'].get(p, 0):.2f}" if ok else "-" for p in phases],
                 f"{r['tokens_per_s']:.0f}" if ok and r.get("tokens_per_s") else "-",
                 f"{mem:.2f}" if mem is not None and r["status"] != "invalid" else "-",
                 f"{pred:.4f}" if pred is not None else "-", (r.get("reason") or "").replace("|", "/")[:160]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [_label(r) for r in ok]
    axes[0].bar(range(len(ok)), [r.get("tokens_per_s") or 0 for r in ok])
    axes[0].set_xticks(range(len(ok)))
    axes[0].set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    axes[0].set_title("throughput per run (tokens/s)")
    by_n: dict[int, list[float]] = {}
    for r in ok:
        by_n.setdefault(r.get("nproc", 1), []).append(r.get("tokens_per_s") or 0)
    xs = sorted(by_n)
    axes[1].plot(xs, [max(by_n[x]) for x in xs], "o-")
    axes[1].set_xlabel("processes (GPUs)")
    axes[1].set_title("best throughput vs processes")
    meas = [(r.get("gpu_peak_gib") or r.get("peak_rss_gib") or 0) for r in ok]
    pred = [((r.get("predicted") or {}).get("train_peak_gib" if r.get("gpu_peak_gib") else "static_gib") or 0)
            for r in ok]
    axes[2].bar([i - 0.2 for i in range(len(ok))], meas, 0.4, label="measured")
    axes[2].bar([i + 0.2 for i in range(len(ok))], pred, 0.4, label="predicted (GPU: peak, CPU: static)")
    axes[2].set_xticks(range(len(ok)))
    axes[2].set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    axes[2].set_title("memory per run (GiB)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    if not (out_dir / "sweep.json").is_file():
        raise ValueError(f"'{out_dir}' is not a sweep directory (no sweep.json)")
    rows = results(out_dir)
    text = markdown(rows)
    (out_dir / "report.md").write_text(text)
    plot(rows, out_dir / "report.png")
    return text + f"\n{out_dir / 'report.md'}, {out_dir / 'report.png'}"
