"""Output safety shared by the converters: never write into a non-empty directory unless forced, build the result
in a temporary sibling, and make it visible with one rename at the end, so a crash never leaves a half output
that looks complete. Also the progress bar."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def begin_output(out: str | Path, force: bool) -> Path:
    """Check `out` and return the (fresh, empty) temporary sibling directory to write into."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out '{out}' is not empty; choose a new directory or pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out '{out}': '{out.parent}' exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)  # as save_pretrained and Megatron-LM do
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_output(tmp: Path, out: str | Path) -> Path:
    """Atomically replace `out` with the finished `tmp` (the old output is removed only after the swap)."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def progress(total: int, desc: str, unit: str = "B"):
    """A tqdm bar on stderr when it is a terminal (or SPARK_PROGRESS=1), silent otherwise."""
    from tqdm import tqdm

    show = os.environ.get("SPARK_PROGRESS") == "1" or sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, disable=not show,
                dynamic_ncols=True, file=sys.stderr)


def run_cli(convert) -> int:
    """The converter CLIs' contract: print the report (exit 0) or one error line naming the problem (exit 2)."""
    import warnings

    # megatron-core warns at import about optional GPU libraries (Apex, TE) a converter never uses
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        report = convert()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
