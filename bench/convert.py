#!/usr/bin/env python
"""Benchmark the checkpoint converters on real Qwen2.5-VL-32B language-model shapes, against a plain copy.

    python bench/convert.py --layers 2 4 --dir /tmp/spark-bench-convert

For each N it writes a synthetic bf16 HF checkpoint (hidden 5120, FFN 27648, 40 heads, 8 KV heads, vocab 152064,
untied, N decoder layers), then times, each in a fresh process with the page cache of its inputs evicted:
  copy bound  reading and writing the same files with a plain buffered copy (+ fsync per file, as the tools do)
  hf->mg      tools' hf_to_megatron
  mg->hf      tools' megatron_to_hf (the export is then compared bit for bit with the synthetic source)
`--repeats` times (default 3, the bound and the tool interleaved) and reports the median and range of wall time,
GB/s (model bytes / time), the ratio to the copy bound, and peak RSS (VmHWM) next to
the process's RSS after imports and the issue's budget (1.5 x largest tensor + 1 GiB). Prints a Markdown table
and a linear extrapolation of the times to the full 64-layer model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden=5120, ffn=27648, heads=40, kv_heads=8, vocab=152064)


def hf_config(layers: int) -> dict:
    s = SHAPE
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": s["hidden"],
            "intermediate_size": s["ffn"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "max_position_embeddings": 32768,
            "hidden_act": "silu", "torch_dtype": "bfloat16"}


def make_synthetic(d: Path, layers: int) -> int:
    """A bf16 HF checkpoint with random weights, streamed to 5 GB shards; returns its tensor bytes."""
    import torch

    from megatron_spark.io.safetensors import ShardedSafetensorsWriter, TensorSpec
    from megatron_spark.mapping.table import expected_hf_shapes
    from megatron_spark.models.hf_config import parse_hf_config

    d.mkdir(parents=True)
    cfg = hf_config(layers)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = expected_hf_shapes(parse_hf_config(cfg))
    w = ShardedSafetensorsWriter(d, [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()])
    g = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        w.write(n, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16))
    return w.close()


def evict(d: Path) -> None:
    """Drop a directory's files from the page cache, so the next read comes from disk."""
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def plain_copy(src: Path, dst: Path, suffixes: tuple[str, ...]) -> tuple[float, int]:
    """The physical bound: read every weight file and write it again (64 MiB buffer, fsync per file)."""
    dst.mkdir()
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.name.endswith(suffixes):
            out = dst / f.name
            with open(f, "rb", buffering=0) as a, open(out, "wb", buffering=0) as b:
                while True:
                    k = a.readinto(buf)
                    if not k:
                        break
                    b.write(view[:k])
                    n += k
                os.fsync(b.fileno())
    return time.perf_counter() - t0, n


CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from megatron_spark.convert.converters import hf_to_megatron, megatron_to_hf
import megatron.core.dist_checkpointing  # imports done before the baseline, as in the tools
def status(field):  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent's address space
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
t0 = time.perf_counter()
r = {call}
dt = time.perf_counter() - t0
print(json.dumps({{"s": dt, "bytes": r.bytes_written, "peak_rss": status("VmHWM"),
                  "base_rss": base}}))
"""


def run_child(call: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), call=call)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if p.returncode:
        raise SystemExit(p.stderr[-4000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def same_tensors(a_dir: Path, b_dir: Path) -> bool:
    import torch

    from megatron_spark.io.safetensors import HFCheckpoint

    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    return sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(n), b.get(n)) for n in a.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3, help="measurements per direction (median and range)")
    ap.add_argument("--dir", default="/tmp/spark-bench-convert")
    a = ap.parse_args()
    import statistics

    largest = SHAPE["vocab"] * SHAPE["hidden"] * 2
    budget = 1.5 * largest + 2 ** 30
    rows, fits = [], {"hf->mg": [], "mg->hf": []}
    for n in a.layers:
        root = Path(a.dir) / f"L{n}"
        shutil.rmtree(root, ignore_errors=True)
        size = make_synthetic(root / "hf", n)
        runs = {"hf->mg": [], "mg->hf": []}
        exact = True
        for rep in range(a.repeats):  # the bound and the tool alternate, so drift of a shared disk hits both
            evict(root)
            copy_s, _ = plain_copy(root / "hf", root / "copy_hf", (".safetensors",))
            shutil.rmtree(root / "copy_hf")
            evict(root)
            fwd = run_child(f"hf_to_megatron({str(root / 'hf')!r}, {str(root / 'mg')!r})")
            evict(root)
            back_copy_s, _ = plain_copy(root / "mg", root / "copy_mg", (".distcp",))
            shutil.rmtree(root / "copy_mg")
            evict(root)
            back = run_child(f"megatron_to_hf({str(root / 'mg')!r}, {str(root / 'export')!r})")
            if rep == 0:
                exact = same_tensors(root / "hf", root / "export")
            runs["hf->mg"].append((fwd, copy_s))
            runs["mg->hf"].append((back, back_copy_s))
            shutil.rmtree(root / "mg")
            shutil.rmtree(root / "export")
        for name, rs in runs.items():
            secs = [r["s"] for r, _ in rs]
            ratios = [cs / r["s"] for r, cs in rs]
            rows.append((name, n, size, secs, [cs for _, cs in rs], ratios, max(r["peak_rss"] for r, _ in rs),
                         rs[0][0]["base_rss"], exact))
            fits[name].append((n, statistics.median(secs)))
        shutil.rmtree(root)
    gb = 1e9
    med = statistics.median
    print(f"\nlargest tensor {largest / gb:.3f} GB; RSS budget 1.5 x largest + 1 GiB = {budget / gb:.2f} GB; "
          f"{a.repeats} repeats, median [min-max]\n")
    print("| direction | layers | model GB | wall s | GB/s | copy s | vs copy | peak RSS GB | RSS after imports GB "
          "| within budget | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, size, secs, copies, ratios, peak, base, exact in rows:
        print(f"| {name} | {n} | {size / gb:.2f} | {med(secs):.1f} [{min(secs):.1f}-{max(secs):.1f}] | "
              f"{size / gb / med(secs):.2f} | {med(copies):.1f} [{min(copies):.1f}-{max(copies):.1f}] | "
              f"{med(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | {peak / gb:.2f} | {base / gb:.2f} | "
              f"{'yes' if peak <= budget else 'NO'} | {'yes' if exact else 'NO'} |")
    if len(a.layers) >= 2:
        layer_bytes = (SHAPE["hidden"] * (SHAPE["hidden"] + 2 * SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv_heads"])
                       + SHAPE["hidden"] ** 2 + 3 * SHAPE["hidden"] * SHAPE["ffn"]) * 2
        full = 64 * layer_bytes + largest * 2
        print(f"\nextrapolated to 64 layers ({full / gb:.1f} GB of language model), from the medians:")
        for name, pts in fits.items():
            (n0, t0), (n1, t1) = pts[0], pts[-1]
            per_layer = (t1 - t0) / (n1 - n0)
            print(f"  {name}: {t0 + per_layer * (64 - n0):.0f} s ({per_layer:.2f} s per layer)")


if __name__ == "__main__":
    main()
