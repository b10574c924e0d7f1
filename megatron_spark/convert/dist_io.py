"""megatron-core `torch_dist` checkpoints, written and read one tensor chunk at a time.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) directory plus megatron's `metadata.json` and
`common.pt`. Each key is a *global* tensor described by the chunks that were saved; loading at any TP/PP reads the
overlap of the chunks it needs, so how the chunks were cut when writing does not matter. We write one chunk per
(parameter, layer) through DCP's public planner interface with data produced lazily in `resolve_data`, and one
file per chunk (DCP keeps every tensor of a file alive until the file is closed), so at most one chunk is in
memory. Reading builds DCP read items for a region and lets the storage reader fill a buffer of that region.
"""
from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


@dataclass(frozen=True)
class ChunkSource:
    """One saved chunk of a global tensor; `produce()` returns its data (shape `sizes`, dtype `dtype`)."""
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Tensor]


@functools.lru_cache(maxsize=None)
def _planner_classes():
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties)
    from torch.distributed.checkpoint.planner import (LoadPlanner, SavePlan, SavePlanner, TensorWriteData, WriteItem,
                                                      WriteItemType)

    class StreamingSavePlanner(SavePlanner):
        """Plans the given chunks and byte objects; materialises each chunk only when the writer asks for it."""

        def __init__(self, chunks: Sequence[ChunkSource], objects: dict[str, bytes],
                     on_chunk: Optional[Callable[[ChunkSource], None]] = None):
            self.chunks, self.objects, self.on_chunk = list(chunks), objects, on_chunk
            self._by_index = {(c.key, tuple(c.offsets)): c for c in self.chunks}

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = True) -> None:
            self.is_coordinator = is_coordinator

        def create_local_plan(self):
            items = [WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(
                                   chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                                   properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
                     for c in self.chunks]
            items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self.objects]
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            plans, metadata = create_default_global_save_plan(all_plans)
            _check_coverage(metadata)
            self.metadata = metadata
            return plans, metadata

        def finish_plan(self, new_plan):
            self.plan = new_plan
            return new_plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(self.objects[write_item.index.fqn])
            c = self._by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            t = c.produce()
            assert tuple(t.shape) == tuple(c.sizes) and t.dtype == c.dtype, (c.key, t.shape, t.dtype, c)
            if self.on_chunk is not None:
                self.on_chunk(c)
            return t.contiguous()

    class RegionLoadPlanner(LoadPlanner):
        """Receives the read items of one region and places them into `dest` (only read_data is driven)."""

        def __init__(self, dest: Tensor):
            self.dest = dest

        def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
            pass

        def create_local_plan(self):
            raise NotImplementedError

        def create_global_plan(self, global_plan):
            raise NotImplementedError

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value) -> None:
            raise AssertionError("region reads carry tensors only")

        def resolve_tensor(self, read_item) -> Tensor:
            t = self.dest
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(dim, o, n)
            return t

        def commit_tensor(self, read_item, tensor) -> None:
            pass

    return StreamingSavePlanner, RegionLoadPlanner


def _volume(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _check_coverage(metadata) -> None:
    """Every global tensor is covered by its chunks exactly (chunks are disjoint by construction)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            covered = sum(_volume(c.sizes) for c in md.chunks)
            assert covered == _volume(md.size), f"'{key}': chunks cover {covered} of {_volume(md.size)} elements"


def write_torch_dist(path: str | Path, chunks: Sequence[ChunkSource], objects: dict[str, bytes], common: dict,
                     on_chunk: Optional[Callable[[ChunkSource], None]] = None, sync_files: bool = True) -> None:
    """Write a complete torch_dist checkpoint directory (`path` must exist and be empty)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    path = Path(path)
    planner_cls, _ = _planner_classes()
    writer = FileSystemWriter(str(path), single_file_per_rank=False, sync_files=sync_files, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=planner_cls(chunks, objects, on_chunk), no_dist=True)
    torch.save(common, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


class DistCheckpointReader:
    """Reads regions of the global tensors of a torch_dist checkpoint (written by us, by training or by Megatron)."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        for name in (".metadata", "metadata.json"):
            if not (self.path / name).is_file():
                raise ValueError(f"'{self.path / name}' is missing: '{self.path}' is not a complete megatron "
                                 f"torch_dist checkpoint (an interrupted save or the wrong directory?)")
        backend = json.loads((self.path / "metadata.json").read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"'{self.path / 'metadata.json'}': sharded_backend is {backend!r}; only torch_dist "
                             f"checkpoints are supported (re-save with --ckpt-format torch_dist)")
        self._reader = FileSystemReader(str(self.path))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:  # a truncated pickle raises many types
            raise ValueError(f"'{self.path / '.metadata'}' cannot be read (truncated or corrupt?): {e}") from e
        self._reader.set_up_storage_reader(self.metadata, True)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        for idx, info in self.metadata.storage_data.items():
            f = self.path / info.relative_path
            if not f.is_file():
                raise ValueError(f"'{f}' (holding '{idx.fqn}') is missing from the checkpoint")
            if f.stat().st_size < info.offset + info.length:
                raise ValueError(f"'{f}' is truncated: '{idx.fqn}' needs bytes up to {info.offset + info.length}, "
                                 f"the file has {f.stat().st_size}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def _md(self, key: str):
        if key not in self.tensors:
            raise ValueError(f"tensor '{key}' is not in the checkpoint '{self.path}' "
                             f"(a checkpoint of another model, or written by an incompatible megatron-core?)")
        return self.tensors[key]

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> Tensor:
        """The region [offsets, offsets+sizes) of global tensor `key`, in the checkpoint's dtype."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        md = self._md(key)
        whole = self._whole_file_chunk(key, md, offsets, sizes)
        if whole is not None:
            return whole
        dest = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        items, covered = [], 0
        for c in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, c.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, c.offsets, c.sizes)]
            if any(h <= a for a, h in zip(lo, hi)):
                continue
            lengths = [h - a for a, h in zip(lo, hi)]
            covered += _volume(lengths)
            items.append(ReadItem(
                type=LoadItemType.TENSOR, dest_index=MetadataIndex(key, torch.Size(offsets)),
                dest_offsets=torch.Size([a - o for a, o in zip(lo, offsets)]),
                storage_index=MetadataIndex(key, c.offsets),
                storage_offsets=torch.Size([a - o for a, o in zip(lo, c.offsets)]),
                lengths=torch.Size(lengths)))
        if covered != _volume(sizes):
            raise ValueError(f"'{self.path}': the saved chunks of '{key}' cover {covered} of the {_volume(sizes)} "
                             f"elements requested; the checkpoint is incomplete")
        _, planner_cls = _planner_classes()
        self._reader.read_data(LoadPlan(items), planner_cls(dest)).wait()
        return dest

    def _whole_file_chunk(self, key: str, md, offsets, sizes) -> Optional[Tensor]:
        """Fast path for checkpoints written one chunk per file (ours): when the request is exactly one saved chunk
        that fills its file, memory-map it instead of loading it and copying it into a second buffer."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        for c in md.chunks:
            if tuple(c.offsets) == tuple(offsets) and tuple(c.sizes) == tuple(sizes):
                info = self.metadata.storage_data.get(MetadataIndex(key, c.offsets))
                f = self.path / info.relative_path if info is not None else None
                if (info is None or info.offset != 0 or getattr(info, "transform_descriptors", None)
                        or f.stat().st_size != info.length):
                    return None
                t = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
                if tuple(t.shape) != tuple(sizes) or t.dtype != md.properties.dtype:
                    raise ValueError(f"'{f}': holds {tuple(t.shape)} {t.dtype} for '{key}', the metadata says "
                                     f"{tuple(sizes)} {md.properties.dtype}; the checkpoint is corrupt")
                return t
        return None
