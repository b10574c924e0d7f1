"""The Qwen2 / Qwen2.5 / Qwen3 / Qwen2.5-VL weight tables: declarative rules, both directions, and the HF tensor
shapes of a checkpoint. `families/qwen.py` hands them to the generic `mapping.table.WeightMap`."""
from __future__ import annotations

from megatron_spark.mapping.transforms import (COLUMN, REPLICATED, ROW, GateUpFuse, QKVInterleave, Rule, Transform,
                                               VocabPad)
from megatron_spark.models.hf_config import ModelShape


def text_rules(t, prefix: str, padded_vocab: int, with_output: bool) -> list[Rule]:
    L = t.num_layers
    hf = "model.layers.{i}."
    mg = prefix + "decoder.layers.{i}."
    qkv = QKVInterleave(t.num_heads, t.num_kv_heads, t.head_dim)
    vocab = VocabPad(t.vocab_size, padded_vocab)
    rules = [
        Rule(prefix + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab),
        Rule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), Transform(REPLICATED), L),
        Rule(mg + "self_attention.linear_qkv.weight",
             tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), qkv, L),
        *([Rule(mg + "self_attention.linear_qkv.bias", tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), qkv,
                L)] if t.qkv_bias else []),
        *([Rule(mg + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",), Transform(REPLICATED), L),
           Rule(mg + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",), Transform(REPLICATED), L)]
          if t.qk_norm else []),
        Rule(mg + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), Transform(ROW), L),
        Rule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), Transform(REPLICATED), L),
        Rule(mg + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
             GateUpFuse(), L),
        Rule(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), Transform(ROW), L),
        Rule(prefix + "decoder.final_layernorm.weight", ("model.norm.weight",), Transform(REPLICATED)),
    ]
    if with_output:
        # Tied: a last pipeline stage still owns an `output_layer.weight` copy of the embedding (PP > 1).
        src = "model.embed_tokens.weight" if t.tied_embeddings else "lm_head.weight"
        rules.append(Rule(prefix + "output_layer.weight", (src,), vocab))
    return rules


def vision_rules(v, prefix: str) -> list[Rule]:
    D = v.depth
    hf = "visual.blocks.{i}."
    mg = prefix + "decoder.layers.{i}."
    head_dim = v.hidden_size // v.num_heads
    qkv = QKVInterleave(v.num_heads, v.num_heads, head_dim, fused_hf=True)
    return [
        Rule(prefix + "patch_embed.weight", ("visual.patch_embed.proj.weight",), Transform(REPLICATED)),
        Rule(mg + "input_layernorm.weight", (hf + "norm1.weight",), Transform(REPLICATED), D),
        Rule(mg + "self_attention.linear_qkv.weight", (hf + "attn.qkv.weight",), qkv, D),
        Rule(mg + "self_attention.linear_qkv.bias", (hf + "attn.qkv.bias",), qkv, D),
        Rule(mg + "self_attention.linear_proj.weight", (hf + "attn.proj.weight",), Transform(ROW), D),
        Rule(mg + "self_attention.linear_proj.bias", (hf + "attn.proj.bias",), Transform(REPLICATED), D),
        Rule(mg + "pre_mlp_layernorm.weight", (hf + "norm2.weight",), Transform(REPLICATED), D),
        Rule(mg + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GateUpFuse(), D),
        Rule(mg + "mlp.linear_fc1.bias", (hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"), GateUpFuse(), D),
        Rule(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), Transform(ROW), D),
        Rule(mg + "mlp.linear_fc2.bias", (hf + "mlp.down_proj.bias",), Transform(REPLICATED), D),
        Rule(prefix + "merger.norm.weight", ("visual.merger.ln_q.weight",), Transform(REPLICATED)),
        Rule(prefix + "merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), Transform(COLUMN)),
        Rule(prefix + "merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), Transform(COLUMN)),
        Rule(prefix + "merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), Transform(ROW)),
        Rule(prefix + "merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",), Transform(REPLICATED)),
    ]


def qwen_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor that a checkpoint of this config holds (the tied lm_head is absent)."""
    t, v = shape.text, shape.vision
    q, kv, h = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, h), "model.norm.weight": (h,)}
    if not t.tied_embeddings:
        out["lm_head.weight"] = (t.vocab_size, h)
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if t.qkv_bias:
                out[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        if t.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (t.head_dim,), p + "self_attn.k_norm.weight": (t.head_dim,)})
        out.update({p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (t.ffn_hidden_size, h),
                    p + "mlp.up_proj.weight": (t.ffn_hidden_size, h),
                    p + "mlp.down_proj.weight": (h, t.ffn_hidden_size)})
    if v is not None:
        vh, f, m = v.hidden_size, v.ffn_hidden_size, v.hidden_size * v.spatial_merge_size ** 2
        out["visual.patch_embed.proj.weight"] = (vh, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                 v.patch_size)
        out.update({"visual.merger.ln_q.weight": (vh,), "visual.merger.mlp.0.weight": (m, m),
                    "visual.merger.mlp.0.bias": (m,), "visual.merger.mlp.2.weight": (v.out_hidden_size, m),
                    "visual.merger.mlp.2.bias": (v.out_hidden_size,)})
        for i in range(v.depth):
            p = f"visual.blocks.{i}."
            out.update({
                p + "norm1.weight": (vh,), p + "norm2.weight": (vh,), p + "attn.qkv.weight": (3 * vh, vh),
                p + "attn.qkv.bias": (3 * vh,), p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
                p + "mlp.gate_proj.weight": (f, vh), p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.weight": (f, vh),
                p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.weight": (vh, f), p + "mlp.down_proj.bias": (vh,)})
    return out
