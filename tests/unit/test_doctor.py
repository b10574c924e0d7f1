"""`megatron-spark doctor`: the install report, on this CPU machine and on hand-made GPU nodes."""
import pytest
import subprocess
import sys
from pathlib import Path

from megatron_spark.doctor import Part, report

ROOT = Path(__file__).resolve().parents[2]
BASE = [Part("torch", "2.13.0", note="CUDA 13.0"), Part("megatron-core", "0.19.0"), Part("transformers", "5.19.0"),
        Part("vllm", "0.32.0")]


@pytest.mark.slow
def test_the_cpu_install_is_ready_and_says_why_gpu_parts_are_missing():
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "doctor"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for name in ("torch", "megatron-core", "transformer-engine", "vllm", "flash-attn", "nvidia-modelopt"):
        assert name in out
    assert "auto will use the local spec" in out and "fine here" in out and out.strip().endswith("ready")
    assert "UserWarning" not in p.stderr


def test_a_gpu_node_with_a_te_core_for_another_cuda_is_not_ready():
    te = Part("transformer-engine", "2.11.0", "ImportError: libcudart.so.12: cannot open shared object file",
              note="core built for CUDA 12 but torch is CUDA 13: reinstall with the extra gpu-kernels")
    text, ok = report(BASE + [te], {"python": "3.12.3", "gpus": ["NVIDIA H100 80GB HBM3"] * 8,
                                    "auto_spec": "local", "te_error": "libcudart.so.12"})
    assert not ok and "reinstall with the extra gpu-kernels" in text and "NOT ready" in text
    assert "8 GPU(s): NVIDIA H100 80GB HBM3" in text and "GPU node without Transformer Engine" in text


def test_a_matching_gpu_install_is_ready():
    te = Part("transformer-engine", "2.11.0", note="core built for CUDA 13")
    text, ok = report(BASE + [te, Part("flash-attn", None)], {"python": "3.12.3", "gpus": ["NVIDIA H100"],
                                                               "auto_spec": "transformer_engine", "te_error": None})
    assert ok and "auto will use the transformer_engine spec" in text and "flash-attn" in text
