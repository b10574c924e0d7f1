"""An HF directory written by the running trainer (`checkpoint.hf_interval`): CKPT/hf/step_0000042, and
CKPT/hf/latest pointing at the newest, so a run can be evaluated and served while it goes.

Streamed through the converter's tables, one pipeline stage at a time: in data-parallel replica 0, the TP ranks of
each stage gather each of their parameters (a collective in the TP group, on the parameters' own device, as NCCL
requires) and TP rank 0 of the stage turns it into HF tensors (`ParamMap.to_hf`: vocabulary padding cut, fused QKV
and gate/up split) and streams them into that stage's shards. No rank ever holds more than one full parameter.
The shard layout is planned from the model's shape alone, identically on every rank, so the stages' files share
one numbering and rank 0 writes the index without gathering anything. Written into `.step_N.tmp`, renamed when
every stage has finished: a directory named step_N is complete. The weights are the trainer's (its dtype), the
same values the weight sync sends to vLLM.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_spark.io.safetensors import TensorSpec, name_shards, split_shards, write_index

HF_DIR = "hf"
LATEST = "latest"


def stage_params(wmap, layout) -> list[list]:
    """Per pipeline stage, the ParamMaps it exports, in the order they are written."""
    layers = wmap.shape.text.num_layers
    per: list[list] = [[] for _ in range(layout.pp)]
    for pm in wmap.export_params():  # the tied output-layer copy is not exported twice
        per[layout.param_stage(pm.megatron, layers)].append(pm)
    return per


def plan_files(stages: list[list], shape, dtype: torch.dtype, max_shard_bytes: int) -> list[list[tuple[str, list]]]:
    """Each stage's shard files, numbered across all stages (model-00003-of-00007.safetensors ...)."""
    from megatron_spark.mapping.table import expected_hf_shapes

    hf_shapes = expected_hf_shapes(shape)
    split = [split_shards([TensorSpec(n, hf_shapes[n], dtype) for pm in stage for n in pm.hf], max_shard_bytes)
             if stage else [] for stage in stages]
    named = iter(name_shards([shard for stage in split for shard in stage]))
    return [[next(named) for _ in stage] for stage in split]


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / HF_DIR / f"step_{step:07d}"


def export_hf(step: int, chunks: list[torch.nn.Module], wmap, layout, hf_dir: str, root: Path,
              keep_last: int, max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Every rank calls this at the same step; returns CKPT/hf/step_N."""
    from megatron.core import parallel_state as ps

    from megatron_spark.io.safetensors import ShardedSafetensorsWriter
    from megatron_spark.models.weights import gather_tp, megatron_named_params

    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    made = [None]
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            made = [str(e)]
    dist.broadcast_object_list(made, src=0)
    if made[0]:
        raise RuntimeError(f"HF export of step {step}: cannot create {tmp} ({made[0]}); the checkpoints are "
                           f"unaffected")
    dtype = next(chunks[0].parameters()).dtype
    stages = stage_params(wmap, layout)
    files = plan_files(stages, wmap.shape, dtype, max_shard_bytes)
    c = layout.coords(rank)
    error = None
    if c["dp"] == 0 and c["cp"] == 0:
        local = {name: p for chunk in chunks for name, p in megatron_named_params(chunk)}
        writer = ShardedSafetensorsWriter(tmp, [], files=files[c["pp"]], write_index=False) if c["tp"] == 0 else None
        tp_group = ps.get_tensor_model_parallel_group()
        with torch.no_grad():
            for pm in stages[c["pp"]]:
                t = local[pm.megatron].detach()
                split = pm.transform.tp_dim is not None and layout.tp > 1
                full = pm.transform.unshard(gather_tp(t, tp_group) if split else [t])
                if writer is not None and error is None:
                    try:  # a full disk: keep gathering, so the TP ranks' collectives stay paired
                        for name, x in pm.to_hf(full).items():
                            writer.write(name, x.to("cpu", dtype))
                    except Exception as e:  # noqa: BLE001 (any error: the others must not wait in a gather)
                        error = f"rank {rank}: {e}"
        if writer is not None and error is None:
            try:
                writer.close()
            except OSError as e:
                error = f"rank {rank}: {e}"
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"HF export of step {step} failed ({'; '.join(e for e in errors if e)}); the "
                           f"checkpoints are unaffected")
    done = [None]
    if rank == 0:
        try:
            _publish(tmp, final, files, hf_dir, dtype, keep_last)
        except Exception as e:  # noqa: BLE001 (told to every rank below, so none waits in a barrier)
            shutil.rmtree(tmp, ignore_errors=True)
            done = [f"rank 0: {e}"]
    dist.broadcast_object_list(done, src=0)
    if done[0]:
        raise RuntimeError(f"HF export of step {step} failed ({done[0]}); the checkpoints are unaffected")
    return final


def _publish(tmp: Path, final: Path, files: list, hf_dir: str, dtype: torch.dtype, keep_last: int) -> None:
    """Rank 0, once every stage's shards are written: index, assets, config, then the rename, `latest` and the
    pruning. Exports of later steps than this one (left by a run that went back to an earlier checkpoint) are
    removed first: `latest` and the pruning then follow the run that is going on."""
    from megatron_spark.convert.converters import hf_config_for_export
    from megatron_spark.convert.layout import copy_hf_assets
    from megatron_spark.io.prompt_protocol import copy_protocol

    write_index(tmp, [f for stage in files for f in stage])
    copy_hf_assets(Path(hf_dir), tmp)
    copy_protocol(final.parent.parent, tmp)  # (CKPT/hf/step_N: the run's prompt protocol is at CKPT)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(hf_config_for_export(cfg, dtype), indent=2) + "\n")
    for later in final.parent.glob("step_*"):
        if later.name > final.name:
            shutil.rmtree(later, ignore_errors=True)
    if final.exists():  # written before, by a run that went back past it: set aside, then replaced
        aside = final.with_name(f".{final.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    link = final.parent / f".{LATEST}.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(final.name)
    os.replace(link, final.parent / LATEST)
    for old in sorted(final.parent.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
