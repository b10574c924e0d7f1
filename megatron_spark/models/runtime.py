"""Running megatron-core models: batches in, full-vocabulary logits out, on any TP/PP layout.

Used by the parity tests, `megatron-spark convert verify` and the trainer's log-prob pass. The pipeline path goes
through megatron-core's own schedule (`get_forward_backward_func`), so PP here is the real 1F1B machinery.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Batch:
    input_ids: Tensor                       # [b, s]
    position_ids: Tensor                    # [b, s] (text RoPE) or [3, b, s] (mrope)
    attention_mask: Tensor                  # [b, 1, s, s] bool, True = blocked
    pixel_values: Optional[Tensor] = None   # [patches, C*T*P*P]
    image_grid_thw: Optional[Tensor] = None  # [images, 3]
    labels: Optional[Tensor] = None         # [b, s]
    image_mask: Optional[Tensor] = None     # [b, s] bool: positions that take image embeddings

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: None if getattr(self, f.name) is None
                        else getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


def causal_mask(input_ids: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
    """Bool [b, 1, s, s], True where attention is blocked (future tokens, and padded keys)."""
    b, s = input_ids.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=input_ids.device), diagonal=1)
    mask = mask.view(1, 1, s, s).expand(b, 1, s, s)
    if pad_mask is not None:  # pad_mask [b, s]: True for real tokens
        mask = mask | ~pad_mask.view(b, 1, 1, s)
    return mask.contiguous()


def make_batch(shape, input_ids: Tensor, pixel_values=None, image_grid_thw=None, labels=None,
               pad_mask: Optional[Tensor] = None, grids_per_sequence: Optional[list] = None) -> Batch:
    """`grids_per_sequence` (one [images, 3] tensor or None per row) pins each row's images to that row."""
    from megatron_spark.models.vision import mrope_positions_and_image_mask

    b, s = input_ids.shape
    image_mask = None
    if shape.multimodal:
        grids = grids_per_sequence if grids_per_sequence is not None else image_grid_thw
        pos, image_mask = mrope_positions_and_image_mask(input_ids, grids, shape.image_token_id,
                                                         shape.vision.spatial_merge_size)
    else:
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s).contiguous()
    return Batch(input_ids, pos, causal_mask(input_ids, pad_mask), pixel_values, image_grid_thw, labels, image_mask)


def call_model(model, batch: Batch):
    """The model's output for a batch: vocab-parallel logits on the last pipeline stage, hidden states elsewhere."""
    kw = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    if batch.pixel_values is not None:
        kw.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, image_mask=batch.image_mask)
    return model(**kw)


def gather_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """[b, s, V/tp] vocab-parallel logits -> [b, s, vocab_size] (padding rows trimmed)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size]


def token_logprobs(vocab_parallel_logits: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """log p(label) [b, s] from this rank's vocab-parallel logits [b, s, V/tp], over the true vocabulary.

    The vocabulary is padded for TP; the padded output rows produce real logits (zero weights -> logit 0), which
    megatron-core's `labels` path leaves in the softmax. vLLM and HF normalise over the true vocabulary only, so
    the padded columns are masked out here; without this the trainer's log-probs sit below the rollout's by
    log(1 + sum of the phantom tokens' probabilities)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = vocab_parallel_logits.float()  # a fresh tensor when the model runs in bf16: masked in place below
    per_rank = logits.shape[-1]
    first_padded = vocab_size - ps.get_tensor_model_parallel_rank() * per_rank
    if first_padded < per_rank:
        if logits is vocab_parallel_logits:
            logits = logits.clone()
        logits[..., max(first_padded, 0):] = float("-inf")
    return -vocab_parallel_cross_entropy(logits, labels)


def pad_sequences(batch: Batch, multiple: int, pad_id: int = 0) -> Batch:
    """The batch right-padded to a sequence length that `multiple` divides (sequence parallelism scatters the
    sequence over TP ranks). The added positions come after every real token, so causal attention keeps them out of
    the real positions' outputs; they attend causally themselves, and their outputs are dropped by the caller."""
    b, s = batch.input_ids.shape
    n = -(-s // multiple) * multiple - s
    if n == 0:
        return batch
    dev = batch.input_ids.device
    ids = torch.nn.functional.pad(batch.input_ids, (0, n), value=pad_id)
    steps = torch.arange(1, n + 1, device=dev)
    pos = torch.cat([batch.position_ids, batch.position_ids[..., -1:] + steps], dim=-1)
    mask = torch.triu(torch.ones(s + n, s + n, dtype=torch.bool, device=dev), diagonal=1).repeat(b, 1, 1, 1)
    mask[..., :s, :s] = batch.attention_mask
    labels = None if batch.labels is None else torch.nn.functional.pad(batch.labels, (0, n), value=pad_id)
    image_mask = None if batch.image_mask is None else torch.nn.functional.pad(batch.image_mask, (0, n))
    return Batch(ids, pos, mask, batch.pixel_values, batch.image_grid_thw, labels, image_mask)


def sequence_multiple(chunks: list) -> int:
    """What the sequence length of a micro-batch must be a multiple of: TP under sequence parallelism, else 1."""
    config = getattr(chunks[0], "module", chunks[0]).config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def pipeline_microbatches(n: int, chunks: list) -> int:
    """How many micro-batches the schedule must run for `n` real ones: with virtual stages, megatron-core's
    interleaved schedule wants at least PP of them and no final group smaller than PP, so round up to a multiple
    of PP (the callers add fillers that carry no loss)."""
    from megatron.core import parallel_state as ps

    if len(chunks) == 1:
        return n
    pp = ps.get_pipeline_model_parallel_world_size()
    return max(pp, -(-n // pp) * pp)


def run_schedule(chunks: list, micro_batches: list, forward_step, *, seq_length: int, micro_batch_size: int,
                 forward_only: bool, variable_seq_lengths: bool = False) -> None:
    """The one driver of megatron-core's pipeline schedule (no pipeline, 1F1B or interleaved), for the trainer,
    the parity checks and the verify tools. `micro_batches` must already be `pipeline_microbatches` long. With
    virtual stages every model chunk reads the micro-batches through its own iterator (the interleaved schedule
    indexes `data_iterator[chunk]`, and the chunks consume the same micro-batches in the same order)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(micro_batches) != pipeline_microbatches(len(micro_batches), chunks):
        raise ValueError(f"{len(micro_batches)} micro-batches cannot run through the interleaved schedule; pad "
                         f"them to pipeline_microbatches(...)")
    if variable_seq_lengths:  # micro-batches of different shapes: the pipeline sends each activation's shape first
        for c in chunks:
            getattr(c, "module", c).config.variable_seq_lengths = True
    data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=len(micro_batches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
        decoder_seq_length=seq_length)


@torch.no_grad()
def forward_logits(chunks: list, batch: Batch, vocab_size: int) -> Optional[Tensor]:
    """Full logits [b, s, vocab] on the last pipeline stage (None on the others)."""
    return forward_backward(chunks, batch, vocab_size, loss_fn=None, forward_only=True)


def forward_backward(chunks: list, batch: Batch, vocab_size: int, loss_fn=None, forward_only: bool = False):
    """One batch through megatron-core's schedule. `loss_fn(logits [b,s,V]) -> scalar` when training.

    Returns the logits (forward only) or the loss, on the last stage; None elsewhere. Under sequence parallelism
    the batch is padded to a multiple of TP and the logits cut back; with virtual stages filler micro-batches
    (no loss) complete the interleaved schedule.
    """
    from megatron.core import parallel_state as ps

    results: list = []
    b, s = batch.input_ids.shape
    padded = pad_sequences(batch, sequence_multiple(chunks))
    micro = [padded] * pipeline_microbatches(1, chunks)

    def step(data_iter, model):
        x = next(data_iter).to(next(model.parameters()).device)  # batches may be built on the host
        output = call_model(model, x)

        def finish(out):
            logits = gather_vocab(out.float(), vocab_size)[:, :s]
            filler = len(results) > 0
            if loss_fn is None or filler:
                results.append(logits.detach())
                return out.sum() * 0.0, {}
            loss = loss_fn(logits)
            results.append(loss.detach())
            return loss * len(micro), {}  # megatron-core divides each micro-batch's loss by their number
        return output, finish

    run_schedule(chunks, micro, step, seq_length=padded.input_ids.shape[1], micro_batch_size=b,
                 forward_only=forward_only)
    if not ps.is_pipeline_last_stage():
        return None
    return results[0] if results else None
