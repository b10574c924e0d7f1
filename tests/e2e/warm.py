"""A tiny model that can already half-solve the shapes task's formats, made with HF transformers on CPU.

The e2e training tests need rollouts with mixed 0/1 rewards (so advantages, gradients and weight updates are not
zero) and every recycled task family in the reward period. A randomly initialised model never writes `\\boxed{}`.
This applies the demo's warm start (`megatron_spark.demo.warm_start_pairs`: every family with a random label of the
right shape) to the HF model directly, so the trainer under test starts from an ordinary HF checkpoint (Qwen2.5-VL
with pictures, or a Qwen2 text model with the text-only variant of the task).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path


def warm_started(hf_dir: str | Path, train_file: str | Path, templates_file: str | Path, out_dir: str | Path, *,
                 steps: int = 40, batch: int = 16, lr: float = 2e-3, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    from megatron_spark.models.hf_config import load_hf_config

    from megatron_spark.data import PromptBuilder, load_records
    from megatron_spark.demo import warm_start_pairs
    from megatron_spark.templates import TemplateBank

    out = Path(out_dir)
    shutil.copytree(hf_dir, out)
    torch.manual_seed(seed)
    multimodal = load_hf_config(str(hf_dir)).family == "qwen2_5_vl"
    cls = Qwen2_5_VLForConditionalGeneration if multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.train()
    prompts = PromptBuilder(str(hf_dir), multimodal, 3136, 3136)
    tok = prompts.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    examples, _ = load_records(train_file)
    families = TemplateBank.load(str(templates_file)).families
    rnd = random.Random(seed)
    samples = []
    for ex in examples:
        for msgs, target in warm_start_pairs(ex, families, rnd):
            b = prompts.build(msgs)
            resp = tok(target)["input_ids"] + [eos]
            ids = torch.tensor([b.input_ids + resp])
            labels = ids.clone()
            labels[0, :len(b.input_ids)] = -100
            extra = dict(pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw) if multimodal else {}
            samples.append(dict(input_ids=ids, labels=labels, **extra))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        for s in rnd.sample(samples, batch):
            (model(**s).loss / batch).backward()
        opt.step()
    model.save_pretrained(str(out))
    return out
