"""HF transformers as the numerical oracle: sample inputs and a logit comparison of a megatron model against HF.

Used by the parity tests, the `make run` smoke demo and `megatron-spark convert verify`.
"""
from __future__ import annotations

import torch

from megatron_spark.models.hf_config import ModelShape
from megatron_spark.models.runtime import forward_logits, make_batch


def hf_reference(path: str, family: str):
    from megatron_spark.models.hf_config import get

    cls = get(family).hf_model_class()
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def sample_inputs(path: str, shape: ModelShape, text_len: int = 24) -> list[tuple[str, dict]]:
    """(name, HF forward kwargs): random text for every model; chat + image prompts (two sizes) for VL."""
    g = torch.Generator().manual_seed(0)
    # Ids above the special-token range, so random text never contains image placeholders.
    cases = [("text", {"input_ids": torch.randint(20, shape.text.vocab_size, (2, text_len), generator=g)})]
    if shape.multimodal:
        from transformers import AutoProcessor

        from megatron_spark.fixtures.tiny import tiny_image

        proc = AutoProcessor.from_pretrained(path)
        for i, size in enumerate([(112, 84), (84, 140)]):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares?"}]}]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True)
            enc = proc(text=[text], images=[tiny_image(i, size)], return_tensors="pt")
            cases.append((f"image{i}", {k: enc[k] for k in ("input_ids", "pixel_values", "image_grid_thw",
                                                          "mm_token_type_ids")}))
    return cases


def to_batch(shape: ModelShape, kw: dict):
    return make_batch(shape, kw["input_ids"], kw.get("pixel_values"), kw.get("image_grid_thw"))


def hf_logits(ref, inputs) -> dict:
    """The oracle's logits per input, computed once (the HF model can then be freed)."""
    with torch.no_grad():
        return {name: ref(**kw).logits.float() for name, kw in inputs}


def compare_logits(chunks, shape: ModelShape, ref, inputs, reference: dict | None = None) -> dict[str, dict]:
    """Max |logit difference| and argmax agreement per input (filled on the last pipeline stage only).
    `reference`: precomputed HF logits by input name (else `ref` is run)."""
    reference = reference if reference is not None else hf_logits(ref, inputs)
    out = {}
    for name, kw in inputs:
        logits = forward_logits(chunks, to_batch(shape, kw), shape.text.vocab_size)
        if logits is None:
            continue
        # both sides on the host: the model's logits are on its GPU, the oracle's (HF on the CPU) are not
        logits, ref_logits = logits.detach().float().cpu(), reference[name].float().cpu()
        agree = logits.argmax(-1) == ref_logits.argmax(-1)
        out[name] = {"max_abs_diff": (logits - ref_logits).abs().max().item(), "argmax_equal": bool(agree.all()),
                     "argmax_agree": int(agree.sum()), "tokens": int(kw["input_ids"].numel()),
                     "max_abs_logit": ref_logits.abs().max().item()}
    return out
