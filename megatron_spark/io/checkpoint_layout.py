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
