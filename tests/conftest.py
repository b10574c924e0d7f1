import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny HF checkpoints covering GQA, odd (padded) vocab, tied and untied embeddings, Qwen2.5-VL."""
    from megatron_spark.fixtures.tiny import build_qwen2, build_qwen2_5_vl

    root = tmp_path_factory.mktemp("tiny")
    return {
        "q2_tied": str(build_qwen2(root / "q2_tied", tied=True)),
        # 8 query heads over 2 KV heads: 4 query heads per group
        "q2_untied_gqa4": str(build_qwen2(root / "q2_untied", hidden=256, heads=8, kv_heads=2, tied=False,
                                          seed=1)),
        "vl_untied": str(build_qwen2_5_vl(root / "vl_untied", tied=False)),
        "vl_tied": str(build_qwen2_5_vl(root / "vl_tied", tied=True, seed=2)),
    }


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch a worker under torchrun (gloo); fail the test with the workers' output on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 1000), str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")
    return proc
