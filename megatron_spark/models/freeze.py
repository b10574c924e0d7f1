"""Freezing parts of the model (`model.freeze`): which Megatron parameters the update leaves alone.

Frozen parameters are marked `requires_grad=False` before megatron-core's DDP and optimizer are built, so they get
no gradient buffer and no optimizer state (megatron-core allocates both only for parameters that require grad);
the bridge still syncs them, so the engine always holds the whole model.
"""
from __future__ import annotations

import re

# named groups -> what they match in our global Megatron parameter names (models/weights.megatron_named_params)
GROUPS = {
    "vision": lambda name: name.startswith("vision_model.") and not name.startswith("vision_model.merger."),
    "projector": lambda name: name.startswith("vision_model.merger."),
    "language_model": lambda name: not name.startswith("vision_model."),
}


def check_freeze(patterns: list[str]) -> None:
    """Every entry is a group name or a valid regular expression (config validation)."""
    for i, p in enumerate(patterns):
        if p in GROUPS:
            continue
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"config field 'model.freeze[{i}]': {p!r} is neither one of {', '.join(GROUPS)} nor a "
                             f"regular expression ({e})") from None


def frozen(name: str, patterns: list[str]) -> bool:
    return any(GROUPS[p](name) if p in GROUPS else re.search(p, name) is not None for p in patterns)


def freeze_parameters(chunks: list, patterns: list[str], multimodal: bool) -> int:
    """Mark the matching parameters of this rank's chunks as not trainable; returns how many elements that is.
    A group that names a part the model does not have is an error (a freeze that does nothing is a typo)."""
    from megatron_spark.models.weights import megatron_named_params

    if not patterns:
        return 0
    if not multimodal and any(p in ("vision", "projector") for p in patterns):
        raise ValueError("config field 'model.freeze': 'vision' and 'projector' need a vision-language model; "
                         "this one is text-only")
    n = 0
    for chunk in chunks:
        for name, p in megatron_named_params(chunk):
            if frozen(name, patterns):
                p.requires_grad_(False)
                n += p.numel()
    return n
