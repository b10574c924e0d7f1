"""The linter (ruff.toml: pyflakes and pycodestyle at 120 columns) over the whole tree: an unused import, an undefined
name or a stray line length fails `make test`, not a review."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (scripts/setup_env.sh installs it from requirements-cpu.txt)")
    p = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
