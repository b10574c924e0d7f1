"""The package as users install it: a built wheel holds every package directory, and every module imports from it
alone (not from this checkout), in a clean directory."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    import shutil

    # built from a copy of the sources: a build/ directory left in the checkout would hide a missing package
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                             "__pycache__", "tests", "docs", "bench"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megatron_spark-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "megatron_spark").rglob("*.py"))
    assert [s for s in sources if s not in names] == []  # (mapping/ once had no __init__.py and was left out)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = [s[:-3].replace("/", ".").removesuffix(".__init__") for s in sources]
    script = ("import importlib, sys\n"
              f"sys.path.insert(0, {str(site)!r})\n"
              "import megatron_spark\n"
              f"assert megatron_spark.__file__.startswith({str(site)!r}), megatron_spark.__file__\n"
              f"for m in {modules!r}:\n"
              "    importlib.import_module(m)\n"
              "print(len(sys.modules))\n")
    clean = tmp_path / "clean"
    clean.mkdir()
    ran = subprocess.run([sys.executable, "-c", script], cwd=clean, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_the_gpu_kernels_match_vllms_cuda_and_flash_attn_is_optional():
    """vLLM 0.32 pins torch 2.13, a CUDA-13 build: TE's plain [pytorch] extra takes its CUDA-12 core, which then
    does not import (and `auto` quietly runs the local spec). flash-attn has no wheel for torch 2.13: optional."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    assert any("core_cu13" in r and r.startswith("transformer-engine[") for r in extras["gpu-kernels"])
    assert any("core_cu12" in r for r in extras["gpu-kernels-cu12"])
    assert not [r for r in extras["gpu-kernels"] + extras["gpu"] if r.startswith("flash-attn")]
    assert "vllm==0.32.0" in extras["gpu"]
