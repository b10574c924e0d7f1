"""HF safetensors checkpoints, read and written one tensor at a time with plain file I/O.

Reading uses `readinto` at the offsets of the file header instead of mmap: mmap'd pages a process has touched
count in its RSS until it unmaps the file, so reading a 67 GB checkpoint through mmap "uses" 67 GB. Here each
tensor lives in its own buffer and is freed when the caller drops it.

Writing plans every shard's header up front (names, shapes and dtypes are known from the config), then streams
the tensors into the files in plan order: no shard is ever assembled in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from megatron_spark.mapping.table import canonical_hf_name

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Entry:
    path: Path
    raw_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset where tensor data begins); every malformation names the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}") from e
    data_start = 8 + header_len
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < data_start + end:
        raise ValueError(f"'{path}' is truncated: {size} bytes on disk, its header needs {data_start + end}; "
                         f"re-download or re-export it")
    return header, data_start


class HFCheckpoint:
    """Lazy reader of an HF safetensors checkpoint (one file, or an index and its shards)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index, single = self.dir / INDEX, self.dir / "model.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"'{index}' is not a valid safetensors index ({e})") from e
        elif single.is_file():
            files = [single.name]
        else:
            raise ValueError(f"'{self.dir}' has neither model.safetensors nor {INDEX}")
        self._entries: dict[str, _Entry] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                raise ValueError(f"shard '{path}' is named in the index but missing; re-download or re-export it")
            header, data_start = _read_header(path)
            for raw, info in header.items():
                if raw == "__metadata__":
                    continue
                if info.get("dtype") not in ST_DTYPES:
                    raise ValueError(f"'{path}': tensor '{raw}' has dtype {info.get('dtype')!r}, which this tool "
                                     f"cannot read")
                b, e = info["data_offsets"]
                self._entries[canonical_hf_name(raw)] = _Entry(path, raw, ST_DTYPES[info["dtype"]],
                                                               tuple(info["shape"]), data_start + b, e - b)
        self._files: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise ValueError(f"tensor '{name}' is missing from the checkpoint in '{self.dir}'")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).path

    def _read(self, e: _Entry, offset: int, nbytes: int, shape: tuple[int, ...]) -> Tensor:
        buf = bytearray(nbytes)
        f = self._files.get(e.path)
        if f is None:
            f = self._files[e.path] = open(e.path, "rb", buffering=0)
        f.seek(e.start + offset)
        got = f.readinto(memoryview(buf))
        if got != nbytes:
            raise ValueError(f"'{e.path}': short read of tensor '{e.raw_name}' ({got} of {nbytes} bytes)")
        if nbytes == 0:
            return torch.empty(shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(shape)

    def get(self, name: str) -> Tensor:
        e = self._entry(name)
        return self._read(e, 0, e.nbytes, e.shape)

    def read_rows(self, name: str, dim: int, start: int, length: int) -> Tensor:
        """Rows [start, start+length) along `dim` (0 or 1) of one tensor; dim 0 reads only those bytes."""
        e = self._entry(name)
        if dim == 0:
            row = e.nbytes // e.shape[0] if e.shape and e.shape[0] else 0
            return self._read(e, start * row, length * row, (length, *e.shape[1:]))
        return self.get(name)[:, start:start + length].contiguous()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Streams tensors into HF safetensors shards whose layout is fixed before the first byte is written.

    `write` must be called once per spec, in spec order; shapes and dtypes are checked against the plan.
    """

    def __init__(self, out_dir: str | Path, specs: Iterable[TensorSpec], max_shard_bytes: int = 5 * 2 ** 30, *,
                 files: Optional[list[tuple[str, list[TensorSpec]]]] = None, write_index: bool = True):
        """`files`: a given layout of (file name, its specs) instead of splitting `specs` here: several writers of
        one directory (one per pipeline stage) then share a numbering, and one of them writes the index
        (`write_index`)."""
        self.dir = Path(out_dir)
        if files is None:
            files = name_shards(split_shards(list(specs), max_shard_bytes))
        self.specs = [spec for _, shard in files for spec in shard]
        self.files = [fname for fname, _ in files]
        self._plan = [(fname, spec) for fname, shard in files for spec in shard]
        self._shards = dict(files)
        self._write_index = write_index
        self._next = 0
        self._open_name: Optional[str] = None
        self._fh = None

    def _open(self, fname: str) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for s in self._shards[fname]:
            header[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._fh = open(self.dir / fname, "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._open_name = fname

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._plan):
            raise AssertionError(f"'{name}' written after the last planned tensor")
        fname, spec = self._plan[self._next]
        assert name == spec.name, f"tensors out of plan order: got '{name}', expected '{spec.name}'"
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"'{name}': {tuple(tensor.shape)} {tensor.dtype} does not match the planned "
                             f"{spec.shape} {spec.dtype}")
        if fname != self._open_name:
            self._close_file()
            self._open(fname)
        t = tensor.detach().contiguous()
        if t.numel():
            self._fh.write(t.view(torch.uint8).reshape(-1).numpy().data)
        self._next += 1

    def close(self) -> int:
        """Finish the last shard and write the index; returns the total bytes of tensor data."""
        if self._next != len(self._plan):
            raise AssertionError(f"only {self._next} of {len(self._plan)} planned tensors were written")
        self._close_file()
        if self._write_index:
            write_index(self.dir, [(f, [s]) for f, s in self._plan])
        return sum(s.nbytes for s in self.specs)


def split_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive specs grouped into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def name_shards(shards: list[list[TensorSpec]]) -> list[tuple[str, list[TensorSpec]]]:
    """HF's shard file names, model-00001-of-0000N.safetensors, in order."""
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", shard) for i, shard in enumerate(shards)]


def write_index(out_dir: str | Path, files: list[tuple[str, list[TensorSpec]]]) -> None:
    """model.safetensors.index.json for shards laid out as `files`."""
    specs = [(f, s) for f, shard in files for s in shard]
    index = {"metadata": {"total_size": sum(s.nbytes for _, s in specs)},
             "weight_map": {s.name: f for f, s in specs}}
    (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=2) + "\n")
