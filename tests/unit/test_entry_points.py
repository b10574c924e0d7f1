"""Code that CI never runs rots: every script and benchmark imports and parses --help, and every step of
scripts/gpu_checks.sh is checked for what can be checked without a GPU (its Python snippets' imports, the flags it
passes to our scripts, the training overrides it uses)."""
import ast
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

ROOT = Path(__file__).resolve().parents[2]
# patch_torchvision.py edits site-packages when run (setup_env.sh's step): it has no --help to parse
SCRIPTS = sorted(p for p in [*ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tools/**/*.py")]
                 if p.name != "patch_torchvision.py")
GPU_CHECKS = ROOT / "scripts" / "gpu_checks.sh"


def _help(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def helps() -> dict[Path, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:  # (2 cores)
        return dict(zip(SCRIPTS, pool.map(_help, SCRIPTS)))


def test_every_script_imports_and_parses_help(helps):
    assert len(SCRIPTS) >= 15, "the script globs found too little"
    bad = {str(p.relative_to(ROOT)): (r.stdout + r.stderr)[-600:] for p, r in helps.items()
           if r.returncode or "usage" not in r.stdout.lower()}
    assert not bad, bad


def _python_snippets(text: str) -> list[str]:
    """The code of every `$py -c "..."` in the shell script."""
    return [m.group(1) for m in re.finditer(r'\$py -c "(.*?)"', text, re.S)] + \
        [m.group(1) for m in re.finditer(r"\$py -c '(.*?)'", text, re.S)]


def test_gpu_checks_snippets_import_what_exists():
    """(The whole smoke lane once died on `from megatron_spark.data import make_shapes_task`, moved elsewhere.)"""
    import importlib

    snippets = _python_snippets(GPU_CHECKS.read_text())
    assert len(snippets) >= 3
    missing = []
    for code in snippets:
        tree = ast.parse(code.replace("$out", "out").replace("$", ""))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("megatron_spark"):
                module = importlib.import_module(node.module)
                missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("megatron_spark"):
                        importlib.import_module(a.name)
    assert not missing, missing


def _invocations(text: str) -> list[list[str]]:
    """`$py some/script.py args...` lines of the script (continuation lines joined), as argument lists."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        m = re.search(r"\$py ((?:bench|scripts|tests/dist)/\S+\.py.*)", line)
        if m:
            out.append(shlex.split(re.sub(r"\$\(.*?\)|\$\{?\w+\}?", "X", m.group(1)), posix=True))
    return out


def test_gpu_checks_pass_only_flags_our_scripts_take(helps):
    calls = [c for c in _invocations(GPU_CHECKS.read_text()) if not c[0].startswith("tests/")]
    assert len(calls) >= 5
    bad = []
    for call in calls:
        usage = helps[ROOT / call[0]].stdout
        bad += [f"{call[0]} {flag}" for flag in call[1:] if flag.startswith("--") and
                flag.split("=")[0] not in usage]
    assert not bad, bad


def test_gpu_checks_training_overrides_are_valid_config():
    from megatron_spark.config import load_config

    joined = re.sub(r"\\\n\s*", " ", GPU_CHECKS.read_text())
    runs = re.findall(r"megatron_spark\.cli train --config (\S+) --nproc-per-node \d+ (.*)", joined)
    assert runs
    for config, rest in runs:
        # (overrides whose value comes from the shell, a path or $dtype, are the run's, not checkable here)
        overrides = [o for o in rest.split() if "=" in o and "$" not in o]
        load_config(str(ROOT / config), overrides)  # (unknown fields and bad values raise)


def test_gpu_checks_dry_run_builds_the_fixtures_and_plans_every_step(tmp_path):
    """What the GPU checklist can do without a GPU: its shell parses, the smoke fixtures build (the step that once
    died on a moved import), every step is listed in the summary table."""
    import os

    p = subprocess.run(["bash", str(GPU_CHECKS), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [r for r in p.stdout.splitlines() if r.startswith("| ") and not r.startswith("| step")]
    assert "| smoke_build | ok |" in p.stdout
    names = [r.split("|")[1].strip() for r in rows]
    for name in ("env", "tests", "smoke_fp32", "smoke_bf16_resume", "convert_verify", "mfu_32b_8k", "sync_32b_fp8"):
        assert name in names, names
    assert (tmp_path / "smoke" / "data" / "train.json").is_file()


def test_gpu_checks_runs_its_steps_through_the_shell(tmp_path):
    """A real (not dry) step that is one of the script's shell functions: `timeout` alone cannot run those (exit
    127 for every smoke step on the first GPU run)."""
    import os

    p = subprocess.run(["bash", str(GPU_CHECKS)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECKS_ONLY="smoke_build"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "| smoke_build | ok |" in p.stdout, p.stdout[-2000:]
    assert (tmp_path / "smoke" / "model" / "config.json").is_file()
