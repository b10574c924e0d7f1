"""Oracles that involve the trainer (its Rollout and Policy) against HF transformers, for the test tiers. They live
here, not in `megatron_spark/models/`, so that the model code knows nothing of RL."""
from __future__ import annotations

import torch


def response_rollouts(inputs, response_len: int = 6) -> list:
    """One Rollout per input: its first row, the last `response_len` tokens as the response."""
    from megatron_spark.policy import Rollout

    return [Rollout(prompt_ids=kw["input_ids"][0, :-response_len].tolist(),
                    response_ids=kw["input_ids"][0, -response_len:].tolist(), group=name,
                    pixel_values=kw.get("pixel_values"), image_grid_thw=kw.get("image_grid_thw"))
            for name, kw in inputs]


def compare_token_logprobs(policy, ref, inputs, response_len: int = 6) -> dict[str, float]:
    """The trainer's per-token log-probs (`Policy.token_logprobs`, vocab-parallel, any TP/PP) against HF's
    log-softmax on the same sequences: max |difference| per input, the last `response_len` tokens of the first
    row scored as the response. Same result on every rank."""
    rollouts, expected = response_rollouts(inputs, response_len), []
    device = next(ref.parameters()).device
    for name, kw in inputs:
        kw = {k: v[:1] if k in ("input_ids", "mm_token_type_ids") else v for k, v in kw.items()}
        ids = kw["input_ids"][0]
        p = len(ids) - response_len
        with torch.no_grad():
            logits = ref(**{k: v.to(device) for k, v in kw.items()}).logits.float()[0].cpu()
        expected.append(torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[p - 1:, 0])
    got = policy.token_logprobs(rollouts)
    return {name: (g - e).abs().max().item() for (name, _), g, e in zip(inputs, got, expected)}
