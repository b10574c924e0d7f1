"""Where a training run leaves its prompt protocol: `prompt_protocol.json` in the checkpoint root, carried into
every HF export and conversion of its weights (its fields and meaning: megatron_spark/evaluation/protocol.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

PROTOCOL_FILE = "prompt_protocol.json"


def copy_protocol(src: str | Path, dst: str | Path) -> None:
    """Copy a model's prompt protocol along with it (exports, conversions), when it has one."""
    f = Path(src) / PROTOCOL_FILE
    if f.is_file():
        shutil.copyfile(f, Path(dst) / PROTOCOL_FILE)
