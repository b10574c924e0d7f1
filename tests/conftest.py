import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# `make test-fast` (tests/README.md): the pure tier, in minutes: no subprocess, no second process, no process group
# (so no megatron-core model), no engine. Tests that need one are marked slow, and the guard below fails any test
# of the tier that tries (so a new test lands in the right tier, or says why).
FAST_TIER = os.environ.get("SPARK_TEST_TIER") == "fast"
HEAVY_DIRS = ("dist", "e2e", "gpu")


def pytest_collection_modifyitems(config, items):
    if not FAST_TIER:
        return
    keep, drop = [], []
    for item in items:
        heavy = "slow" in item.keywords or "gpu" in item.keywords or \
            any(part in HEAVY_DIRS for part in Path(str(item.fspath)).relative_to(ROOT / "tests").parts[:-1])
        (drop if heavy else keep).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(autouse=True)
def _fast_tier_guard(monkeypatch):
    """In the fast tier: starting a process or a process group fails the test, naming the fix."""
    if FAST_TIER:
        import multiprocessing.process

        import torch.distributed as dist

        def refuse(what):
            def fail(*args, **kwargs):
                raise RuntimeError(f"the fast tier runs no {what}: mark this test @pytest.mark.slow "
                                   f"(tests/README.md)")
            return fail
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse("subprocess"))
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("second process"))
        monkeypatch.setattr(dist, "init_process_group", refuse("process group (nor megatron-core model)"))
    yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny HF checkpoints covering GQA, odd (padded) vocab, tied and untied embeddings, Qwen3, Qwen2.5-VL."""
    from megatron_spark.fixtures.tiny import build_qwen2, build_qwen2_5_vl, build_qwen3

    root = tmp_path_factory.mktemp("tiny")
    return {
        "q2_tied": str(build_qwen2(root / "q2_tied", tied=True)),
        # 8 query heads over 2 KV heads: 4 query heads per group
        "q2_untied_gqa4": str(build_qwen2(root / "q2_untied", hidden=256, heads=8, kv_heads=2, tied=False,
                                          seed=1)),
        "vl_untied": str(build_qwen2_5_vl(root / "vl_untied", tied=False)),
        "vl_tied": str(build_qwen2_5_vl(root / "vl_tied", tied=True, seed=2)),
        # q/k norms, no qkv bias, head_dim 64 apart from hidden 128 / 4 heads
        "q3_tied": str(build_qwen3(root / "q3_tied", tied=True, seed=9)),
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
