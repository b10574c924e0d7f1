"""What a megatron-core checkpoint of a model holds, and the small metadata that makes it self-describing.

`checkpoint_layout` asks megatron-core itself: it builds the model on the meta device (no memory, well under a
second even at 32B) at TP=PP=1 and reads its `sharded_state_dict()`: the dist-checkpointing key, global shape and
layer index of every parameter, and the `_extra_state` objects. The installed megatron-core therefore decides the
keys (layer-stacked names, TE-style norm names, swiglu fc1), and a checkpoint written from this layout loads at
any TP/PP through dist-checkpointing's resharding.

Every checkpoint root (converted or written by training) carries `megatron_spark.json` (family, HF config, true
and padded vocabulary, dtype, tool version) and `hf_assets/` (tokenizer, processor, generation config), so that
`megatron_to_hf` can export it without the original HF directory.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_spark import __version__
from megatron_spark.models.hf_config import ModelShape

META_FILE = "megatron_spark.json"
ASSETS_DIR = "hf_assets"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".distcp")
_WEIGHT_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class ParamEntry:
    param: str                      # our global megatron parameter name (the WeightMap key)
    key: str                        # dist-checkpointing key
    global_shape: tuple[int, ...]   # including the prepended layer axis when `stacked`
    stacked: bool                   # layers of a TransformerBlock share one key along a leading layer axis
    layer: int                      # index on that axis (0 when not stacked)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The parameter's own (unsharded, one-layer) shape."""
        return self.global_shape[1:] if self.stacked else self.global_shape

    def region(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of this parameter inside the global tensor."""
        zeros = (0,) * len(self.full_shape)
        return ((self.layer, *zeros), (1, *self.full_shape)) if self.stacked else (zeros, self.full_shape)


@dataclass(frozen=True)
class CheckpointLayout:
    params: dict[str, ParamEntry]   # by parameter name
    objects: tuple[str, ...]        # unique keys of the ShardedObjects (`_extra_state`: FP8 metadata, None here)
    padded_vocab: int


@contextlib.contextmanager
def single_process_parallel() -> Iterator[None]:
    """megatron-core's parallel state for one process (TP=PP=1), without a rendezvous port."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_spark import compat, cpu_shim

    if dist.is_initialized():
        raise AssertionError("single_process_parallel() is for the single-process tools")
    cpu_shim.install()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        compat.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        model_parallel_cuda_manual_seed(0)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def checkpoint_layout(shape: ModelShape, padded_vocab: int) -> CheckpointLayout:
    """The keys, global shapes and objects megatron-core expects for this model (see the module doc)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_spark.models.build import build_model
    from megatron_spark.parallel import ParallelLayout

    # With divisible_by = padded and TP = 1 the model pads the vocabulary to exactly `padded_vocab`.
    with single_process_parallel(), torch.device("meta"):
        chunks = build_model(shape, ParallelLayout(tp=1, pp=1, world_size=1), dtype=torch.float32, use_te=False,
                             make_vocab_size_divisible_by=padded_vocab, device="meta")
        sd = chunks[0].sharded_state_dict()
    params, objects = {}, []
    for name, v in sd.items():
        if isinstance(v, ShardedObject):
            objects.append(v.unique_key)
            continue
        if isinstance(v, ShardedTensorFactory):
            v = v.build()
            v = v[0] if isinstance(v, (list, tuple)) else v
        assert isinstance(v, ShardedTensor), (name, type(v))
        stacked = v.prepend_axis_num == 1
        assert v.prepend_axis_num in (0, 1), (name, v.prepend_axis_num)
        params[name] = ParamEntry(name, v.key, tuple(v.global_shape), stacked,
                                  v.global_offset[0] if stacked else 0)
    return CheckpointLayout(params, tuple(objects), padded_vocab)


def none_object_bytes() -> bytes:
    """What megatron-core stores for an `_extra_state` without FP8 metadata: the list of the objects' data."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


# -- self-describing checkpoints ----------------------------------------------------------------------------------
def write_model_metadata(root: Path, hf_config: dict, shape: ModelShape, padded_vocab: int, dtype: str,
                         source: Optional[str], hf_assets_from: Optional[Path]) -> None:
    """`hf_assets/` then `megatron_spark.json` (replaced atomically: its presence means both are complete)."""
    if hf_assets_from is not None:
        copy_hf_assets(hf_assets_from, root / ASSETS_DIR)
    meta = {"format": "megatron-spark-checkpoint/1", "tool_version": __version__, "family": shape.family,
            "vocab_size": shape.text.vocab_size, "padded_vocab_size": padded_vocab, "dtype": dtype,
            "source": source, "hf_config": hf_config}
    tmp = root / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, root / META_FILE)


def copy_hf_assets(src: Path, dst: Path) -> list[str]:
    """Every non-weight top-level file of an HF directory (config, tokenizer, processor, chat template)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_NAMES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def read_model_metadata(ckpt_root: Path) -> dict:
    path = ckpt_root / META_FILE
    if not path.is_file():
        raise ValueError(f"'{path}' not found: the checkpoint does not say which model it holds. For a checkpoint "
                         f"written by another tool pass --hf-config-dir with the original HF model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from e
