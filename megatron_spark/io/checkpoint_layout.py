"""The Megatron-LM checkpoint directory layout, shared by the trainer's checkpoints and the converters:
CKPT/iter_0000042/ (torch_dist) plus CKPT/latest_checkpointed_iteration.txt naming the last complete iteration,
and loading only the model weights of such a checkpoint into built model chunks."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: str | Path) -> Optional[int]:
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"'{path}' should hold an iteration number, found {text!r}")
    step = int(text)
    if not iter_dir(Path(root), step).is_dir():
        raise ValueError(f"'{path}' names iteration {step} but '{iter_dir(Path(root), step)}' is missing")
    return step


MANIFEST = "megatron_spark_manifest.json"


def write_manifest(it_dir: Path) -> None:
    """Every file of a finished iteration directory with its size, written last (atomically): the proof that the
    checkpoint was complete when it was written, which `check_iteration` compares with what is on disk."""
    import json
    import os

    files = {str(p.relative_to(it_dir)): p.stat().st_size for p in sorted(it_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    tmp = it_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    os.replace(tmp, it_dir / MANIFEST)


def check_iteration(it_dir: Path) -> Optional[str]:
    """Why this iteration directory cannot be trusted (a file missing, truncated or grown since it was written,
    no manifest), or None. Checkpoints written before manifests existed are trusted if their metadata is there."""
    import json

    manifest = it_dir / MANIFEST
    if not manifest.is_file():
        return None if (it_dir / ".metadata").is_file() and (it_dir / "common.pt").is_file() else \
            f"no {MANIFEST} and no complete torch_dist metadata"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, size in files.items():
        p = it_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, {size} when written"
    return None


def complete_steps(root: str | Path) -> list[int]:
    """The iterations of a checkpoint directory, newest first (the tracker's, then any other finished one)."""
    root = Path(root)
    steps = sorted({int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()},
                   reverse=True)
    tracked = latest_step(root) if (root / TRACKER).is_file() and (root / TRACKER).read_text().strip().isdigit() \
        and iter_dir(root, int((root / TRACKER).read_text().strip())).is_dir() else None
    return ([tracked] if tracked is not None else []) + [s for s in steps if s != tracked and
                                                        (tracked is None or s < tracked)]


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron-LM checkpoint root (tracker file) or one iteration directory (torch_dist `.metadata`)."""
    p = Path(path)
    return (p / TRACKER).is_file() or (p / ".metadata").is_file()


def resolve_checkpoint(ckpt: str | Path, field: str = "--ckpt", iteration: Optional[int] = None
                       ) -> tuple[Path, Path]:
    """(checkpoint root, iteration directory) for a root (latest complete iteration, or `iteration`) or an
    `iter_*` directory; errors name `field`, the flag or config field the path came from."""
    path = Path(ckpt)
    if not path.is_dir():
        raise ValueError(f"{field} '{path}' is not a directory")
    if (path / ".metadata").is_file():  # an iteration directory itself
        return path.parent, path
    if iteration is None:
        iteration = latest_step(path)
        if iteration is None:
            raise ValueError(f"{field} '{path}' has no {TRACKER} and no .metadata: not a megatron checkpoint "
                             f"(root or iter_* directory)")
    d = iter_dir(path, iteration)
    if not d.is_dir():
        have = sorted(p.name for p in path.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
        raise ValueError(f"--iteration {iteration}: '{d}' does not exist; available: {have or 'none'}")
    return path, d


def model_sharded_state(modules: list) -> dict:
    """The model part of a checkpoint's state dict, named as Megatron-LM names it ("model", or "model0".. with VPP)."""
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def load_model_weights(modules: list, path: str | Path) -> None:
    """Load only the model weights of a torch_dist checkpoint (converted, or written by training at any layout)
    into this rank's model chunks; dist-checkpointing reads just this rank's slices."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state(modules)
    loaded = dist_checkpointing.load(state, str(path))
    for name, m in zip(state, modules):
        load_strict(m, loaded[name], path)


def load_strict(module, state: dict, path) -> None:
    """Every parameter of the module must come from the checkpoint and every checkpoint entry must be used: a
    silently skipped tensor would resume (or export) a model that is partly the initial one."""
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not fit this model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}; was it written for "
                         f"another model (check model.hf_dir)?")
