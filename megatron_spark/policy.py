"""The Megatron side of RL: token log-probs and optimizer steps over micro-batches of rollouts, any TP/PP.

Log-probs come from megatron-core's vocab-parallel cross-entropy over the true vocabulary (`runtime.token_logprobs`:
the TP padding columns are masked), so full-vocabulary logits are never gathered. Updates go through megatron-core's
DDP, optimizer and pipeline schedule; the learning rate follows megatron-core's OptimizerParamScheduler, stepped
once per optimizer step of either period.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_spark.config import ModelConfig, TrainingConfig
from megatron_spark.kinds import TaskKind
from megatron_spark.loss import MicroBatch
from megatron_spark.models.runtime import call_model, token_logprobs


@dataclass
class Rollout:
    """One sampled response to one prompt, with everything the update needs."""
    prompt_ids: list[int]
    response_ids: list[int]
    group: str                            # prompt id: advantages are normalised within a group
    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None
    reward: float = 0.0
    advantage: float = 0.0
    rollout_logprobs: Optional[list[float]] = None  # from vLLM (diagnostics: train/rollout drift)
    old_logprobs: Optional[Tensor] = None            # [R] policy before the update (Megatron)
    ref_logprobs: Optional[Tensor] = None            # [R] frozen reference (Megatron)
    kind: TaskKind = TaskKind.TASK
    old_is_current: bool = False                      # pi_old = the weights this update runs at: use them


def collate(rollouts: list[Rollout], shape, pad_id: int, seq_len: int, n_real: Optional[int] = None) -> MicroBatch:
    """Right-padded micro-batch. Response token j of a sample sits at position P+j and is predicted at P+j-1.

    Rows from `n_real` on are fillers (a pipeline needs equal micro-batches): their loss mask is zero."""
    from megatron_spark.models.runtime import make_batch

    b = len(rollouts)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_len)
    real = torch.zeros(b, seq_len, dtype=torch.bool)
    old = torch.zeros(b, seq_len)
    ref = torch.zeros(b, seq_len)
    rollout = torch.zeros(b, seq_len)  # the engine's log-probs of the sampled tokens (0 where none: ratio 1)
    current = torch.zeros(b, 1, dtype=torch.bool)  # rows whose pi_old is the policy being trained (no pass)
    known = torch.zeros(b, 1, dtype=torch.bool)    # rows with the engine's log-probs (the drift check)
    adv = torch.zeros(b)
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.response_ids
        n, p, nr = len(seq), len(r.prompt_ids), len(r.response_ids)
        ids[i, :n] = torch.tensor(seq)
        labels[i, :n - 1] = torch.tensor(seq[1:])
        real[i, :n] = True
        if n_real is None or i < n_real:
            mask[i, p - 1:p - 1 + nr] = 1.0
        if r.old_logprobs is not None:
            old[i, p - 1:p - 1 + nr] = r.old_logprobs
        if r.ref_logprobs is not None:
            ref[i, p - 1:p - 1 + nr] = r.ref_logprobs
        if r.rollout_logprobs is not None and len(r.rollout_logprobs) == nr:
            rollout[i, p - 1:p - 1 + nr] = torch.tensor(r.rollout_logprobs)
            known[i] = True
        elif r.old_logprobs is not None:
            rollout[i, p - 1:p - 1 + nr] = r.old_logprobs
        current[i] = r.old_is_current
        adv[i] = r.advantage
    pix = [r.pixel_values for r in rollouts if r.pixel_values is not None]
    grids = [r.image_grid_thw for r in rollouts if r.image_grid_thw is not None]
    batch = make_batch(shape, ids, torch.cat(pix) if pix else None, torch.cat(grids) if grids else None,
                       labels=labels, pad_mask=real, grids_per_sequence=[r.image_grid_thw for r in rollouts])
    return MicroBatch(mask, old, ref, adv, rollout, batch, current, known, b if n_real is None else n_real)


class Policy:
    """Model chunks (DDP-wrapped when trainable) + optimizer + LR schedule."""

    def __init__(self, chunks: list, shape, pad_id: int, micro_batch_size: int, optimizer=None, scheduler=None,
                 max_tokens_per_micro_batch: Optional[int] = None):
        self.chunks, self.shape, self.pad_id, self.mbs = chunks, shape, pad_id, micro_batch_size
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_tokens = max_tokens_per_micro_batch
        self.optimizer_steps = 0
        self.offloaded = False
        self.tokens_real = 0       # tokens of real samples in the micro-batches computed so far (this rank)
        self.tokens_computed = 0   # tokens computed, padding and pipeline fillers included

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, shape, layout, model: ModelConfig, training: TrainingConfig, *, pad_id: int,
              total_steps: int = 1, trainable: bool = True) -> "Policy":
        """This rank's chunks built as `model` says (dtype, transformer_impl, recompute_activations for the update;
        a frozen model never runs a backward) and filled from `model.hf_dir` (only this rank's slices) or from the
        torch_dist checkpoint `model.megatron_ckpt`; trainable ones wrapped as `training` says (`for_training`)."""
        from megatron.core import parallel_state as ps

        from megatron_spark.mapping.table import WeightMap
        from megatron_spark.dtypes import torch_dtype
        from megatron_spark.models.build import build_model
        from megatron_spark.models.weights import HFCheckpoint, load_hf_into_megatron

        dtype = torch_dtype(model.dtype)
        chunks = build_model(shape, layout, dtype=dtype, transformer_impl=model.transformer_impl,
                             recompute=model.recompute_activations if trainable else "none")
        if model.megatron_ckpt:
            from megatron_spark.io.checkpoint_layout import load_model_weights, resolve_checkpoint

            load_model_weights(chunks, resolve_checkpoint(model.megatron_ckpt, "model.megatron_ckpt")[1])
        else:
            load_hf_into_megatron(chunks, WeightMap(shape, tp=layout.tp), HFCheckpoint(model.hf_dir),
                                  ps.get_tensor_model_parallel_rank(), layout.tp)
        if not trainable:
            for c in chunks:
                c.eval()
                c.requires_grad_(False)
            return cls(chunks, shape, pad_id, training.micro_batch_size)
        from megatron_spark.models.freeze import freeze_parameters

        freeze_parameters(chunks, model.freeze, shape.vision is not None)
        return cls.for_training(chunks, shape, dtype=dtype, pad_id=pad_id, training=training,
                                total_steps=total_steps)

    @classmethod
    def for_training(cls, chunks: list, shape, *, dtype: torch.dtype, pad_id: int, training: TrainingConfig,
                     total_steps: int) -> "Policy":
        """Wrap built chunks in megatron-core's DDP, optimizer (distributed on GPU) and LR schedule."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = training
        use_dist_opt = bool(t.use_distributed_optimizer and torch.cuda.is_available())  # see docs/cpu.md
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt)
        wrapped = []
        for c in chunks:
            c.config.finalize_model_grads_func = finalize_model_grads
            wrapped.append(DistributedDataParallel(c.config, ddp_cfg, c))
        opt_cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.lr * t.min_lr_ratio,
                                  weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                                  adam_eps=t.adam_eps,
                                  clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  params_dtype=dtype, use_distributed_optimizer=use_dist_opt)
        optimizer = get_megatron_optimizer(opt_cfg, wrapped)
        warmup = math.ceil(t.warmup_ratio * total_steps)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if warmup else t.lr, max_lr=t.lr, min_lr=t.lr * t.min_lr_ratio,
            lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style="cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        return cls(wrapped, shape, pad_id, t.micro_batch_size, optimizer, scheduler, t.max_tokens_per_micro_batch)

    # -- state (checkpoints) ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the sharded model and optimizer: the LR schedule and the step count."""
        return {"scheduler": self.scheduler.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state["optimizer_steps"]

    def sharded_state(self, loading: bool = False) -> dict:
        """The model chunks' and the optimizer's dist-checkpointing state ("model" / "model0".., "optimizer")."""
        from megatron_spark import compat
        from megatron_spark.io.checkpoint_layout import model_sharded_state

        model_sd = model_sharded_state(self.modules)
        if loading:  # torch's Adam has no state before its first step: give it shapes to load into (docs/cpu.md)
            compat.prepare_optimizer_for_loading(self.optimizer)
        return dict(model_sd, optimizer=self.optimizer.sharded_state_dict(model_sd, is_loading=loading))

    def load_sharded(self, loaded: dict, path) -> None:
        """Take what `dist_checkpointing.load` returned for `sharded_state(loading=True)`; every tensor must fit."""
        from megatron_spark.io.checkpoint_layout import load_strict

        for i, m in enumerate(self.modules):
            load_strict(m, loaded["model" if len(self.modules) == 1 else f"model{i}"], path)
        with torch.no_grad():
            self.optimizer.load_state_dict(loaded["optimizer"])

    def offload(self) -> None:
        """Move the (frozen) weights to host memory between uses: the reference model on a tight GPU."""
        if torch.cuda.is_available() and not self.offloaded:
            for m in self.modules:
                m.to("cpu")
            self.offloaded = True

    def onload(self) -> None:
        if self.offloaded:
            for m in self.modules:
                m.to(torch.cuda.current_device())
            self.offloaded = False

    @torch.no_grad()
    def copy_weights_from(self, other: "Policy") -> None:
        """Make this (frozen reference) model equal to `other`, e.g. after a supervised warm start."""
        for mine, theirs in zip(self.modules, other.modules):
            for p, q in zip(mine.parameters(), theirs.parameters()):
                p.copy_(q)

    @property
    def modules(self) -> list:
        """The unwrapped model chunks (what the bridge and checkpoints see)."""
        return [getattr(c, "module", c) for c in self.chunks]

    # -- passes ------------------------------------------------------------------------------------------------
    def micro_batch_layout(self, rollouts: list[Rollout], pp: int, seq_multiple: int = 1,
                           microbatches: Optional[Callable[[int], int]] = None
                           ) -> list[tuple[list[Rollout], int, int]]:
        """(rows, real rows, padded length) of each micro-batch `_run` computes: under a pipeline without a token
        budget every micro-batch has `mbs` rows (fillers) padded to the longest sequence of the call, since the
        pipeline's buffers are one shape; otherwise each is padded only to its own longest. Lengths are multiples
        of `seq_multiple` (TP under sequence parallelism); `microbatches(n)` is how many micro-batches the schedule
        must run for n (virtual stages: a multiple of PP), the extra ones being fillers without a loss."""
        def up(n: int, m: int) -> int:
            return -(-n // m) * m

        fixed = math.lcm(8, seq_multiple)
        seq_len = up(max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts), fixed)
        out = []
        for part in self._micro_batches(rollouts):
            n_real, longest = len(part), max(len(r.prompt_ids) + len(r.response_ids) for r in part)
            if self.max_tokens is None and pp > 1:
                out.append((part + [part[0]] * (self.mbs - n_real), n_real, seq_len))
            elif self.max_tokens is None:
                out.append((part, n_real, up(longest, fixed)))
            else:  # token budget: each micro-batch only as long and as wide as it needs
                out.append((part, n_real, up(longest, seq_multiple)))
        want = microbatches(len(out)) if microbatches is not None else len(out)
        out += [(out[-1][0], 0, out[-1][2])] * (want - len(out))
        return out

    def _run(self, rollouts: list[Rollout], loss_fn: Optional[Callable], forward_only: bool,
             share_of_batch: bool = False) -> list[dict]:
        """Forward (and backward) over micro-batches through `runtime.run_schedule`. With `share_of_batch` each
        micro-batch's loss is scaled by micro-batches x DP ranks, which megatron-core divides back out (it averages
        micro-batches and DP ranks)."""
        from megatron.core import parallel_state as ps

        from megatron_spark.models.runtime import pipeline_microbatches, run_schedule, sequence_multiple

        device = next(self.modules[0].parameters()).device  # batches are built on the host
        pp = ps.get_pipeline_model_parallel_world_size()
        layout = self.micro_batch_layout(rollouts, pp, sequence_multiple(self.chunks),
                                         lambda n: pipeline_microbatches(n, self.chunks))
        param_dtype = next(self.modules[0].parameters()).dtype
        micro = []  # on the host: one micro-batch at a time goes to the device (in `step`), not the whole call
        for part, n_real, length in layout:
            mb = collate(part, self.shape, self.pad_id, length, n_real)
            b = mb.batch
            if b.pixel_values is not None and b.pixel_values.is_floating_point():
                b.pixel_values = b.pixel_values.to(param_dtype)  # (the vision tower casts to it anyway)
            micro.append(mb)
            self.tokens_real += sum(len(r.prompt_ids) + len(r.response_ids) for r in part[:n_real])
            self.tokens_computed += len(part) * length
        seq_len = max(length for _, _, length in layout)  # what the pipeline's buffers are sized for
        real_micro = sum(1 for _, n_real, _ in layout if n_real)
        # (micro-batch means: megatron-core averages over every micro-batch, the fillers of virtual stages too)
        loss_scale = len(micro) * ps.get_data_parallel_world_size(with_context_parallel=True) \
            if share_of_batch else len(micro) / real_micro
        outputs: list[dict] = []

        vocab = self.shape.text.vocab_size

        def step(data_iter, model):
            mb = next(data_iter).to(device)
            out = call_model(model, mb.batch)  # vocab-parallel logits on the last stage

            def finish(logits):
                logp = token_logprobs(logits, mb.batch.labels, vocab)
                outputs.append({"logp": logp.detach(), "mask": mb.mask, "n_real": mb.n_real})
                if loss_fn is None:
                    return logp.sum() * 0.0, {}
                loss, metrics = loss_fn(logp, mb)
                return loss * loss_scale, metrics
            return out, finish

        run_schedule(self.chunks, micro, step, seq_length=seq_len, micro_batch_size=self.mbs,
                     forward_only=forward_only, variable_seq_lengths=self.max_tokens is not None and pp > 1)
        return outputs

    def _micro_batches(self, rollouts: list[Rollout]) -> list[list[Rollout]]:
        """Fixed-size micro-batches, or (max_tokens_per_micro_batch) consecutive runs under a token budget.
        Order is kept, so per-rollout outputs line up with the input."""
        if self.max_tokens is None:
            return [rollouts[i:i + self.mbs] for i in range(0, len(rollouts), self.mbs)]
        out, cur, longest = [], [], 0
        for r in rollouts:
            n = len(r.prompt_ids) + len(r.response_ids)
            if cur and max(longest, n) * (len(cur) + 1) > self.max_tokens:
                out.append(cur)
                cur, longest = [], 0
            cur.append(r)
            longest = max(longest, n)
        return out + ([cur] if cur else [])

    def _from_last_stage(self, obj):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        box = [obj]
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(box, src=src, group=ps.get_pipeline_model_parallel_group())
        return box[0]

    @torch.no_grad()
    def token_logprobs(self, rollouts: list[Rollout]) -> list[Tensor]:
        """Per-response-token log-probs [R_i] for every rollout, on every rank."""
        outs = self._run(rollouts, None, forward_only=True)
        res = []
        for o in outs:  # (one host copy per micro-batch, not one per row: each copy is a device sync)
            logp, mask = o["logp"][:o["n_real"]].cpu(), o["mask"][:o["n_real"]].cpu()
            res += [logp[row][mask[row] > 0] for row in range(o["n_real"])]
        return self._from_last_stage(res)[:len(rollouts)]

    def _gradients_finite(self) -> bool:
        """Are this step's (reduced) gradients finite on every rank? One flag, agreed over the whole job: a NaN on
        one pipeline stage or tensor shard must stop every rank's update alike."""
        bad = any(not torch.isfinite(b.grad_data).all() for c in self.chunks
                  for b in list(getattr(c, "buffers", [])) + list(getattr(c, "expert_parallel_buffers", [])))
        flag = torch.tensor([float(bad)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    def weights_finite(self) -> bool:
        """Every parameter finite, on every rank (checked before a checkpoint is written)."""
        bad = any(not torch.isfinite(p).all() for m in self.modules for p in m.parameters())
        flag = torch.tensor([float(bad)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    def train_step(self, rollouts: list[Rollout], loss_fn: Callable) -> dict:
        """One optimizer step on these rollouts (this rank's data-parallel share of the global batch) with a loss of
        loss.py (`loss_fn(logp, MicroBatch) -> (loss, metrics)`).

        `loss_fn.share_of_batch` False: it returns a micro-batch mean; megatron-core averages them over micro-batches
        and data-parallel ranks (and so do the metrics). True: it returns the micro-batch's share of the
        global batch's loss (sums over its tokens divided by the batch's counts, `algorithm.BatchSize`); the shares
        of all micro-batches on all DP ranks add up to the batch loss, whatever the layout (and so do the metrics)."""
        from megatron.core import parallel_state as ps

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics: list[dict] = []
        share_of_batch = bool(getattr(loss_fn, "share_of_batch", False))

        def wrapped(logp, mb):
            loss, m = loss_fn(logp, mb)
            if mb.n_real:  # (a filler micro-batch of virtual stages adds nothing)
                metrics.append({k: float(v) for k, v in m.items()})
            return loss, {}
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        self._run(rollouts, wrapped, forward_only=False, share_of_batch=share_of_batch)
        if self._gradients_finite():
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.optimizer_steps += 1
            skipped = 0
        else:  # a non-finite loss or gradient on some rank: every rank skips this update (weights stay finite)
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            ok, grad_norm, skipped = False, float("nan"), 1
        keys = sorted({k for m in metrics for k in m if not k.endswith("_max")})
        peaks = sorted({k for m in metrics for k in m if k.endswith("_max")})  # maxima, not shares or means
        if share_of_batch:
            agg = {k: sum(m[k] for m in metrics) for k in keys}
        else:
            agg = {k: sum(m[k] for m in metrics) / len(metrics) for k in keys}
        agg.update({k: max(m.get(k, 0.0) for m in metrics) for k in peaks})
        agg = self._from_last_stage(agg)
        if dp > 1 and agg:
            group = ps.get_data_parallel_group(with_context_parallel=True)
            keys = [k for k in agg if not k.endswith("_max")]  # (every DP rank reports the same keys)
            t = torch.tensor([agg[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t, group=group)
            agg = {k: v / (1 if share_of_batch else dp) for k, v in zip(keys, t.tolist())} | \
                {k: agg[k] for k in agg if k.endswith("_max")}
            if any(k.endswith("_max") for k in agg):
                names = sorted(k for k in agg if k.endswith("_max"))
                m = torch.tensor([agg[k] for k in names], dtype=torch.float64)
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                agg.update(zip(names, m.tolist()))
        agg.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   lr=self.optimizer.param_groups[0]["lr"], update_ok=bool(ok), update_skipped=skipped)
        return agg
