"""Evaluation throughput on this machine: `megatron-spark eval`'s in-process vLLM backend vs its server backend
(a real `vllm serve` on 127.0.0.1) vs batched HF `generate`, on the same items, greedy, same settings.

    python bench/eval.py [--items 32] [--max-tokens 64] [--repeats 3]

Each repeat runs the three back to back (interleaved, so drift on a shared machine hits all of them); engines and
the server are started once, before timing. Reports items/s as median [min-max] and the
ratio to the in-process backend. The model is the tiny random Qwen2.5-VL: it rarely stops early, so every backend
generates about max-tokens tokens per item.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    import requests

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                             "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
                             "--mm-processor-kwargs", '{"size": {"shortest_edge": 3136, "longest_edge": 3136}}'],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not start: {log.read_text()[-2000:]}")


def hf_generate(model_dir: str, items, gen, batch: int = 16):
    """Batched greedy HF generate with the same chat template, image bounds and repetition penalty."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def run() -> int:
        tokens = 0
        for k in range(0, len(items), batch):
            chunk = items[k:k + batch]
            texts = [proc.apply_chat_template(
                [{"role": "system", "content": gen.system_prompt},
                 {"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": it.problem + "\n" + gen.suffix}]}],
                add_generation_prompt=True, tokenize=False) for it in chunk]
            images = [Image.open(it.image_path).convert("RGB") for it in chunk]
            inputs = proc(text=texts, images=images, padding=True, return_tensors="pt",
                          images_kwargs={"size": {"shortest_edge": gen.min_pixels, "longest_edge": gen.max_pixels}})
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=gen.max_tokens, do_sample=False,
                                     repetition_penalty=gen.repetition_penalty)
            new = out[:, inputs["input_ids"].shape[1]:]
            tokens += int((new != proc.tokenizer.pad_token_id).sum())
        return tokens
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from megatron_spark.fixtures.shapes import make_shapes_benchmark
    from megatron_spark.evaluation.backends import ServerBackend, VLLMBackend, conversation
    from megatron_spark.evaluation.items import load_items
    from megatron_spark.evaluation.settings import GenerationSettings
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = str(build_qwen2_5_vl(tmp / "model", min_pixels=3136, max_pixels=3136))
    _, items = load_items(make_shapes_benchmark(tmp / "bench", a.items, seed=0))
    gen = GenerationSettings(max_tokens=a.max_tokens, min_pixels=3136, max_pixels=3136)
    convs = [conversation(f"{it.problem}\n{gen.suffix}", it.image_path, gen.system_prompt) for it in items]
    port = _port()
    server = start_server(model, port, tmp / "server.log")
    try:
        local = VLLMBackend(model)
        remote = ServerBackend(f"http://127.0.0.1:{port}", "tiny", concurrency=16)
        hf = hf_generate(model, items, gen)
        runs = {"vllm in-process": lambda: len(local.chat(convs, gen)),
                "vllm serve (16 concurrent)": lambda: len(remote.chat(convs, gen)),
                "HF generate (batch 16)": hf}
        for fn in runs.values():  # warm-up: first-call allocations and compilation stay out of the timing
            fn()
        times: dict[str, list[tuple[float, int]]] = {k: [] for k in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                tokens = fn()
                times[name].append((time.perf_counter() - t0, tokens))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    base = statistics.median(a.items / t for t, _ in times["vllm in-process"])
    print(f"\n{a.items} items, max {a.max_tokens} new tokens, greedy, {a.repeats} repeats "
          f"(median [min-max]); {os.cpu_count()} CPU cores")
    hf_tokens = times["HF generate (batch 16)"][0][1] / a.items
    print(f"HF generated {hf_tokens:.1f} new tokens per item (the random model rarely stops before max-tokens)")
    print("| backend | items/s | vs in-process |\n|---|---:|---:|")
    for name, ts in times.items():
        ips = sorted(a.items / t for t, _ in ts)
        print(f"| {name} | {statistics.median(ips):.2f} [{ips[0]:.2f}-{ips[-1]:.2f}] | "
              f"{statistics.median(ips) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
