"""HF <-> megatron-core torch_dist conversion for every registered model family, streamed one tensor at a time.

Both directions walk the same weight map (mapping/table.py, filled by the family) and the same checkpoint layout
(layout.py), so there is one path per concern: the typed transforms (QKV interleave, gate/up fuse, vocab pad) turn
the HF tensors of one parameter into its full megatron tensor and back, and dist-checkpointing does every TP/PP
resharding at load time. Memory: one parameter (plus its HF pieces) at a time; the largest is the embedding or the
fused fc1 of one layer.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from megatron_spark.convert.layout import (ASSETS_DIR, checkpoint_layout, copy_hf_assets, none_object_bytes,
                                           read_model_metadata, write_model_metadata)
from megatron_spark.convert.output import begin_output, finish_output, progress
from megatron_spark.io.checkpoint_layout import TRACKER, resolve_checkpoint
from megatron_spark.dtypes import NAMES, hf_name, torch_dtype
from megatron_spark.io.safetensors import HFCheckpoint, ShardedSafetensorsWriter, TensorSpec
from megatron_spark.mapping.table import WeightMap, expected_hf_shapes
from megatron_spark.mapping.transforms import padded_vocab_size
from megatron_spark.models.hf_config import ModelShape, load_hf_config, parse_hf_config

DTYPE_NAMES = {torch_dtype(n): n for n in NAMES}  # the torch dtypes a checkpoint may hold, by config name


@dataclass
class ConvertReport:
    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    dtype: str
    padded_vocab: int

    def summary(self) -> str:
        gb = self.bytes_written / 1e9
        return (f"wrote {self.out}: {self.tensors} tensors, {gb:.3f} GB {self.dtype} in {self.seconds:.1f} s "
                f"({gb / max(self.seconds, 1e-9):.2f} GB/s), vocabulary padded to {self.padded_vocab}")


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def cast_checked(t: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Cast, refusing a dtype the weights cannot take (fp16 overflow) rather than writing infinities."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if dtype == torch.float16 and torch.isinf(out).any() and not torch.isinf(t).any():
        raise ValueError(f"--dtype fp16: tensor '{name}' has values beyond fp16's range (max |x| = "
                         f"{t.abs().max().item():.4g} > 65504); use --dtype bf16 or fp32")
    return out


def check_layout_args(shape: ModelShape, tp: int, pp: int) -> None:
    from megatron_spark.parallel import check_model_layout

    check_model_layout(shape, tp, pp)


def check_hf_checkpoint(ckpt: HFCheckpoint, shape: ModelShape) -> torch.dtype:
    """Every tensor the config implies exists with its shape and a float dtype, and none is unmapped.
    Returns the checkpoint's dtype (that of the word embedding)."""
    expected = expected_hf_shapes(shape)
    for name, want in expected.items():
        if name not in ckpt:
            raise ValueError(f"tensor '{name}' is missing from '{ckpt.dir}' (config.json implies it); the "
                             f"checkpoint is incomplete or belongs to another model")
        if ckpt.shape(name) != want:
            raise ValueError(f"'{ckpt.file_of(name)}': tensor '{name}' has shape {ckpt.shape(name)} but config.json "
                             f"implies {want}")
        if not ckpt.dtype(name).is_floating_point or ckpt.dtype(name) not in DTYPE_NAMES:
            raise ValueError(f"'{ckpt.file_of(name)}': tensor '{name}' is {ckpt.dtype(name)}; only unquantized "
                             f"bf16/fp16/fp32 checkpoints can be converted")
    ignorable = {"lm_head.weight"} if shape.text.tied_embeddings else set()
    extra = sorted(k for k in ckpt.keys() if k not in expected and k not in ignorable)
    if extra:
        raise ValueError(f"'{ckpt.dir}' holds {len(extra)} tensors this converter has no mapping for (e.g. "
                         f"{extra[:3]}); refusing to drop them silently")
    embedding = next(p for p in WeightMap(shape).params if p.megatron.endswith("embedding.word_embeddings.weight"))
    return ckpt.dtype(embedding.hf[0])


def _unwrap_checkpoint_exception(e: BaseException) -> BaseException:
    """DCP wraps errors raised while writing; surface our own ValueErrors as they are."""
    for v in getattr(e, "failures", {}).values():
        inner = v[0] if isinstance(v, tuple) else v
        if isinstance(inner, ValueError):
            return inner
    return e


def hf_to_megatron(hf_dir: str | Path, out: str | Path, *, dtype: Optional[str] = None, tp: int = 1, pp: int = 1,
                   force: bool = False, sync_files: bool = True) -> ConvertReport:
    """HF directory -> megatron-core torch_dist checkpoint (Megatron-LM layout), loadable at any TP/PP.

    `tp` matters only for vocabulary padding (to a multiple of lcm(128, tp): the same for every power-of-two TP up
    to 128); `pp` is only checked against the layer count.
    """
    from megatron_spark.convert.dist_io import ChunkSource, write_torch_dist

    t0 = time.time()
    hf_dir = Path(hf_dir)
    shape = load_hf_config(hf_dir)
    check_layout_args(shape, tp, pp)
    if dtype is not None and dtype not in NAMES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(NAMES)}")
    ckpt = HFCheckpoint(hf_dir)
    try:
        src_dtype = check_hf_checkpoint(ckpt, shape)
        out_dtype = torch_dtype(dtype) if dtype else src_dtype
        padded = padded_vocab_size(shape.text.vocab_size, 128, tp)
        wmap = WeightMap(shape, make_vocab_size_divisible_by=128, tp=tp)
        layout = checkpoint_layout(shape, padded)
        tmp = begin_output(out, force)
        try:
            chunks = []
            for e in layout.params.values():
                offsets, sizes = e.region()

                def produce(pm=wmap[e.param], e=e, sizes=sizes) -> Tensor:
                    full = cast_checked(pm.to_megatron(ckpt.get), out_dtype, e.param)
                    assert tuple(full.shape) == e.full_shape, (e.param, full.shape, e.full_shape)
                    return full.reshape(sizes)
                chunks.append(ChunkSource(e.key, e.global_shape, offsets, sizes, out_dtype, produce))
            total = sum(_nbytes(c.sizes, out_dtype) for c in chunks)
            bar = progress(total, "hf -> megatron")
            it = tmp / "iter_0000000"
            it.mkdir()
            common = {"checkpoint_version": 3.0, "iteration": 0,
                      "megatron_spark": {"converted_from": str(hf_dir), "dtype": DTYPE_NAMES[out_dtype]}}
            try:
                write_torch_dist(it, chunks, {k: none_object_bytes() for k in layout.objects}, common,
                                 on_chunk=lambda c: bar.update(_nbytes(c.sizes, out_dtype)), sync_files=sync_files)
            except BaseException as e:  # DCP's CheckpointException derives from BaseException
                inner = _unwrap_checkpoint_exception(e)
                if inner is e:
                    raise
                raise inner from None
            finally:
                bar.close()
            (tmp / TRACKER).write_text("0")
            write_model_metadata(tmp, json.loads((hf_dir / "config.json").read_text()), shape, padded,
                                 DTYPE_NAMES[out_dtype], str(hf_dir.absolute()), hf_dir)
            final = finish_output(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        ckpt.close()
    return ConvertReport(final, len(chunks), total, time.time() - t0, DTYPE_NAMES[out_dtype], padded)


# -- megatron -> HF -------------------------------------------------------------------------------------------------
def _language_prefix(shape: ModelShape) -> str:
    return shape.kind.megatron_prefix


def hf_config_for_export(cfg: dict, dtype: torch.dtype) -> dict:
    """The HF config.json of an export: the source config with the written dtype (both key spellings, text and
    vision sections alike)."""
    cfg = json.loads(json.dumps(cfg))
    name = hf_name(DTYPE_NAMES[dtype])
    for d in [cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}]:
        for k in ("torch_dtype", "dtype"):
            if k in d:
                d[k] = name
    if "torch_dtype" not in cfg and "dtype" not in cfg:
        cfg["torch_dtype"] = name
    return cfg


def megatron_to_hf(ckpt: str | Path, out: str | Path, *, iteration: Optional[int] = None,
                   dtype: Optional[str] = None, hf_config_dir: Optional[str | Path] = None, force: bool = False,
                   max_shard_bytes: int = 5 * 2 ** 30, quantize: Optional[str] = None,
                   calib_data: Optional[str | Path] = None, calib_prompts: int = 16):
    """A converted or training checkpoint (any TP/PP/VPP it was written at) -> HF directory; with `quantize`, the
    modelopt-quantized HF checkpoint of that export (quant/export.py), the plain export being a temporary step."""
    from megatron_spark.convert.dist_io import DistCheckpointReader
    from megatron_spark.io.prompt_protocol import copy_protocol

    t0 = time.time()
    root, it = resolve_checkpoint(ckpt, "--ckpt", iteration)
    if quantize is not None:
        return _quantized_export(root, it, out, quantize, calib_data, calib_prompts, dtype=dtype,
                                 hf_config_dir=hf_config_dir, force=force)
    if dtype is not None and dtype not in NAMES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(NAMES)}")
    if hf_config_dir is not None:
        cfg_path = Path(hf_config_dir) / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"--hf-config-dir: '{cfg_path}' not found")
        hf_config, assets = json.loads(cfg_path.read_text()), Path(hf_config_dir)
    else:
        hf_config, assets = read_model_metadata(root)["hf_config"], root / ASSETS_DIR
    shape = parse_hf_config(hf_config, source=str(root))
    reader = DistCheckpointReader(it)
    emb_key = _language_prefix(shape) + "embedding.word_embeddings.weight"
    padded = reader.shape(emb_key)[0]
    if padded < shape.text.vocab_size:
        raise ValueError(f"'{it}': the embedding has {padded} rows, fewer than vocab_size={shape.text.vocab_size}"
                         f" of the config; is the HF config the one this checkpoint was made from?")
    layout = checkpoint_layout(shape, padded)
    for e in layout.params.values():
        if reader.shape(e.key) != e.global_shape:
            raise ValueError(f"'{it}': '{e.key}' has shape {reader.shape(e.key)} but the HF config implies "
                             f"{e.global_shape}; is the config the one this checkpoint was made from?")
    out_dtype = torch_dtype(dtype) if dtype else reader.dtype(emb_key)
    if out_dtype not in DTYPE_NAMES:
        raise ValueError(f"the checkpoint's weights are {out_dtype}; pass --dtype bf16, fp16 or fp32")
    wmap = WeightMap(shape, make_vocab_size_divisible_by=padded, tp=1)
    hf_shapes = expected_hf_shapes(shape)
    params = wmap.export_params()
    specs = [TensorSpec(n, hf_shapes[n], out_dtype) for p in params for n in p.hf]
    tmp = begin_output(out, force)
    try:
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes)
        total = sum(s.nbytes for s in specs)
        with progress(total, "megatron -> hf") as bar:
            for p in params:
                e = layout.params[p.megatron]
                full = reader.read(e.key, *e.region()).reshape(e.full_shape)
                for name, t in p.to_hf(full).items():
                    t = cast_checked(t, out_dtype, name)
                    writer.write(name, t)
                    bar.update(_nbytes(t.shape, out_dtype))
        total = writer.close()
        if assets.is_dir():
            copy_hf_assets(assets, tmp)
        copy_protocol(root, tmp)  # a training run's prompt protocol goes with its weights (megatron-spark eval)
        (tmp / "config.json").write_text(json.dumps(hf_config_for_export(hf_config, out_dtype), indent=2) + "\n")
        final = finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertReport(final, len(specs), total, time.time() - t0, DTYPE_NAMES[out_dtype], padded)


def _quantized_export(root: Path, iteration_dir: Path, out: str | Path, fmt: str, calib_data, calib_prompts: int,
                      **kw):
    """megatron_to_hf(..., quantize=fmt): refuse a bad request before reading any weight, export the plain HF
    checkpoint into a temporary sibling of `out`, quantize it into `out`, remove the temporary export."""
    from megatron_spark.quant.export import check_request, quantize_hf

    hf_config_dir = kw.get("hf_config_dir")
    hf_config = (json.loads((Path(hf_config_dir) / "config.json").read_text()) if hf_config_dir
                 else read_model_metadata(root)["hf_config"])
    check_request(fmt, hf_config, calib_data)
    out = Path(out).absolute()
    if out.is_dir() and any(out.iterdir()) and not kw.get("force"):
        raise ValueError(f"--out '{out}' is not empty; choose a new directory or pass --force to replace it")
    plain = out.with_name(f".{out.name}.unquantized-{os.getpid()}")
    try:
        megatron_to_hf(iteration_dir, plain, dtype=kw.get("dtype"), hf_config_dir=hf_config_dir,
                       force=True)
        return quantize_hf(plain, out, fmt, calib_data=calib_data, calib_prompts=calib_prompts,
                           force=kw.get("force", False))
    finally:
        shutil.rmtree(plain, ignore_errors=True)
