#!/usr/bin/env python
"""`megatron-spark eval` in-process vs through `vllm serve`: the same per-item answers? On a real model.

    python bench/eval_parity.py --model .cache/models/smollm2-135m-instruct [--model runs/.../ckpt] [--items 32]

For each --model (an HF directory, or a Megatron checkpoint: the in-process run evaluates it directly through its
temporary export, the server serves `megatron-spark convert megatron-to-hf`'s export of it): an arithmetic
benchmark (fixtures.arithmetic) evaluated plain + self-reflection (tts), once with the in-process vLLM engine and
once through a real `vllm serve` on 127.0.0.1 with the same settings (greedy). Reports, per model, how many items
got the same output, the same extracted answer, the same plain and tts scores, and the wall time of each.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(hf_dir: Path, port: int, log: Path) -> subprocess.Popen:
    import requests

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
                             "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not start: {log.read_text()[-2000:]}")


def evaluate(bench: Path, out: Path, model_args: list[str], max_tokens: int) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "megatron_spark.cli", "eval", str(bench), "--out", str(out), "--mode",
                    "tts", "--max-tokens", str(max_tokens), "--force", *model_args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - t0


def records(d: Path) -> dict[str, dict]:
    return {r["id"]: r for f in sorted(d.glob("results*.jsonl")) for r in map(json.loads, f.read_text().splitlines())}


def compare(model: str, items: int, max_tokens: int, tmp: Path) -> dict:
    from megatron_spark.fixtures.arithmetic import write_benchmark
    from megatron_spark.io.checkpoint_layout import is_megatron_checkpoint

    bench = write_benchmark(tmp / "bench", items, seed=4321, level="add2")
    hf_dir = Path(model)
    if is_megatron_checkpoint(model):
        hf_dir = tmp / "export"
        subprocess.run([sys.executable, "-m", "megatron_spark.cli", "convert", "megatron-to-hf", "--ckpt", model,
                        "--out", str(hf_dir), "--dtype", "fp32", "--force"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    local_s = evaluate(bench, tmp / "local", ["--model", model], max_tokens)
    port = _port()
    server = serve(hf_dir, port, tmp / "server.log")
    try:
        served_s = evaluate(bench, tmp / "served", ["--server", f"http://127.0.0.1:{port}", "--model", "m"],
                            max_tokens)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    a, b = records(tmp / "local"), records(tmp / "served")
    same = lambda k: sum(a[i].get(k) == b[i].get(k) for i in a if i in b)  # noqa: E731
    return {"model": model, "items": len(a), "both": len(set(a) & set(b)), "same_output": same("output"),
            "same_answer": same("extracted"), "same_plain": same("correct"), "same_tts": same("tts_correct"),
            "plain_accuracy": sum(r["correct"] for r in a.values()) / len(a),
            "local_s": round(local_s), "served_s": round(served_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="HF directory or Megatron checkpoint")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    rows = []
    for m in a.model:
        with tempfile.TemporaryDirectory(prefix="eval-parity-") as d:
            rows.append(compare(m, a.items, a.max_tokens, Path(d)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | items | same output | same answer | same plain / tts score | plain accuracy | in-process s "
          "| served s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['items']} | {r['same_output']} | {r['same_answer']} | {r['same_plain']} / "
              f"{r['same_tts']} | {r['plain_accuracy']:.3f} | {r['local_s']} | {r['served_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
