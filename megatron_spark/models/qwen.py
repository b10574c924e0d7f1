"""Qwen2 / Qwen2.5 / Qwen3 text and Qwen2.5-VL models built from megatron-core parts.

The text model is megatron-core's `GPTModel` (RoPE, or multimodal RoPE for VL). The Qwen2.5-VL vision tower is a
`TransformerBlock` of megatron-core layers whose attention is masked per image (full-attention blocks) or per
window (the rest), with 2-D rotary embeddings and a spatial patch merger.

Decision: the vision tower is tensor-parallel over the same TP group as the language model (its linears are
megatron Column/RowParallel layers, heads split across ranks). Its replicated parameters (norms, patch embedding,
row-parallel biases) see identical inputs and identical upstream gradients on every TP rank (the column-parallel
backward all-reduces input grads), so their grads agree without an extra reduction. Under PP it lives on the
first stage only, where the image embeddings are spliced into the token embeddings.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_spark import compat
from megatron_spark.mapping.transforms import padded_vocab_size
from megatron_spark.models.build import BUILD_OFF_GPU
from megatron_spark.models.hf_config import ModelShape, TextShape, VisionShape
from megatron_spark.models.vision import (vision_attention_masks, vision_packed_seq_params, vision_rotary_freqs,
                                          vision_window_index)

try:
    from megatron.core.transformer.module import MegatronModule as _MegatronModule
except ImportError:  # pragma: no cover - megatron-core is a hard dependency; keeps the docs importable
    _MegatronModule = torch.nn.Module

class TorchRMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm: torch's, in the model's dtype, and usable under sequence parallelism.

    megatron-core's WrappedTorchNorm refuses sequence parallelism: each TP rank then normalises a different part
    of the sequence, so the (replicated) weight's gradient must be summed over TP, which megatron-core's
    finalize_model_grads does for parameters tagged `sequence_parallel`. It also keeps the weight in fp32 whatever
    the model's dtype, which a bf16 model without a Float16Module wrapper cannot multiply with."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _base_config(layout, dtype: torch.dtype, use_te: bool, **kw):
    from megatron.core.transformer import TransformerConfig

    on_cpu = not torch.cuda.is_available() or BUILD_OFF_GPU.get()
    return TransformerConfig(**compat.transformer_config_kwargs(
        hidden_dropout=0.0, attention_dropout=0.0,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=on_cpu, perform_initialization=False,
        gradient_accumulation_fusion=False,       # needs Apex' fused wgrad kernel
        apply_rope_fusion=use_te, bias_activation_fusion=use_te, bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te, persist_layer_norm=use_te,
        attention_softmax_in_fp32=True,
        **kw))


def _recompute_kwargs(recompute) -> dict:
    """megatron-core's recompute fields for none / selective / full (True / False are full / none)."""
    mode = {True: "full", False: "none", None: "none"}.get(recompute, recompute)
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"config field 'model.recompute_activations': {recompute!r}; use none, selective or full")
    if mode == "full":  # every layer's input kept; the layer recomputed in the backward
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":  # only the attention core (scores, softmax) recomputed
        return dict(recompute_granularity="selective")
    return {}


def text_transformer_config(t: TextShape, layout, dtype: torch.dtype, use_te: bool, recompute="none"):
    return _base_config(
        layout, dtype, use_te,
        num_layers=t.num_layers, hidden_size=t.hidden_size, ffn_hidden_size=t.ffn_hidden_size,
        num_attention_heads=t.num_heads, num_query_groups=t.num_kv_heads, kv_channels=t.head_dim,
        add_qkv_bias=t.qkv_bias, add_bias_linear=False, layernorm_epsilon=t.rms_norm_eps,
        qk_layernorm=t.qk_norm,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        # Virtual stages: Megatron-LM's defaults (overlapped, unbatched p2p). The batched form posts send_prev
        # before send_next, and at PP=2 both go to the same peer, which receives prev before next: the gradient and
        # the activation (same shape) swap places, silently (measured: layer-0 gradients 500x off)
        **({"overlap_p2p_comm": True, "batch_p2p_comm": False} if layout.vpp else {}),
        **_uneven_stages(layout, t.num_layers),
        mrope_section=list(t.mrope_section) if t.mrope_section else None,
        **_recompute_kwargs(recompute))


def _uneven_stages(layout, num_layers: int) -> dict:
    """megatron-core's first/last-stage layer counts when the stages are not all equal."""
    stages = layout.stage_layers(num_layers)
    if len(set(stages)) <= 1:
        return {}
    return {"num_layers_in_first_pipeline_stage": stages[0], "num_layers_in_last_pipeline_stage": stages[-1]}


def vision_transformer_config(v: VisionShape, layout, dtype: torch.dtype, use_te: bool, recompute="none"):
    # The vision tower is not pipelined (it sits on the first stage): PP=1 in its own config. It is never sequence
    # parallel: its patches are not scattered over TP ranks (the language model's embedding is, after the splice).
    from dataclasses import replace

    config = _base_config(
        replace(layout, sequence_parallel=False), dtype, use_te,
        **_recompute_kwargs(recompute),
        num_layers=v.depth, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_heads, num_query_groups=v.num_heads, kv_channels=v.hidden_size // v.num_heads,
        add_qkv_bias=True, add_bias_linear=True, layernorm_epsilon=v.rms_norm_eps,
        pipeline_model_parallel_size=1)
    # the rotary angles are per patch (2-D positions); TE's fused THD rope would restart them in every window
    config.apply_rope_fusion = False
    return config


def build_gpt(t: TextShape, layout, *, dtype: torch.dtype, use_te: bool, pre_process: bool, post_process: bool,
              make_vocab_size_divisible_by: int = 128, vp_stage: Optional[int] = None, recompute="none"):
    from megatron.core.models.gpt import GPTModel

    config = text_transformer_config(t, layout, dtype, use_te, recompute)
    kwargs = dict(vp_stage=vp_stage) if vp_stage is not None else {}
    spec = compat.gpt_layer_spec(use_te, norm_cls=TorchRMSNorm, qk_layernorm=t.qk_norm)
    if not use_te:  # the final norm too must be a torch RMSNorm (compat.local_block_spec says why)
        spec = compat.local_block_spec(spec, config, TorchRMSNorm, vp_stage)
    return GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(t.vocab_size, make_vocab_size_divisible_by, layout.tp),
        max_sequence_length=t.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=t.tied_embeddings,
        position_embedding_type="mrope" if t.mrope_section else "rope",
        rotary_base=t.rope_theta, parallel_output=True, **kwargs)


class PatchMerger(_MegatronModule):
    """RMSNorm, then groups of spatial_merge_size^2 patches -> MLP (column-, then row-parallel).

    A MegatronModule so that checkpoints see its linears' TP sharding (a plain Module is saved as replicated)."""

    def __init__(self, v: VisionShape, config):
        super().__init__(config=config)
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.merged = v.hidden_size * v.spatial_merge_size ** 2
        self.norm = TorchRMSNorm(config, v.hidden_size, eps=v.rms_norm_eps)
        init = torch.nn.init.zeros_
        self.linear_fc1 = ColumnParallelLinear(self.merged, self.merged, config=config, init_method=init,
                                               bias=True, gather_output=False)
        self.linear_fc2 = RowParallelLinear(self.merged, v.out_hidden_size, config=config, init_method=init,
                                            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.linear_fc1(self.norm(x).reshape(-1, self.merged))
        out, _ = self.linear_fc2(F.gelu(h))
        return out


class Qwen25VisionModel(_MegatronModule):
    """The Qwen2.5-VL vision tower on megatron-core layers (see the module docstring for the TP decision)."""

    def __init__(self, v: VisionShape, config, use_te: bool):
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.transformer_block import TransformerBlock

        self.shape = v
        self.config = config
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        # A Conv3d whose stride equals its kernel is a matmul over flattened patches; keep the conv's shape so
        # the weight maps 1:1 onto HF's `patch_embed.proj.weight`.
        self.patch_embed = torch.nn.Module()
        self.patch_embed.weight = torch.nn.Parameter(torch.zeros(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size,
            dtype=config.params_dtype))
        self.patch_dim = patch_dim
        spec = copy.deepcopy(compat.gpt_layer_spec(use_te, norm_cls=TorchRMSNorm))
        # TE: variable-length (THD) attention over the windows / frames, no mask; local spec: dense block masks
        self.use_te = use_te
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask if use_te
                                                 else AttnMaskType.padding}
        self.decoder = TransformerBlock(config, spec, pre_process=True, post_process=False)
        self.merger = PatchMerger(v, config)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """pixel_values [patches, C*T*P*P] and grid_thw [images, 3] -> merged embeddings [patches/4, out_hidden]."""
        v = self.shape
        unit = v.spatial_merge_size ** 2
        w = self.patch_embed.weight
        x = F.linear(pixel_values.to(w.dtype), w.reshape(v.hidden_size, -1))
        window_index, cu_windows = vision_window_index(grid_thw, v)
        n = x.shape[0]
        # Reorder patches window by window (in merge units) so window attention is block-diagonal.
        x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
        freqs = vision_rotary_freqs(grid_thw, v)
        freqs = freqs.reshape(n // unit, unit, -1)[window_index].reshape(n, 1, 1, -1)
        if self.use_te:  # (the rotary table spans the whole packed input: megatron-core maps it by offset)
            full, window = vision_packed_seq_params(grid_thw, cu_windows, x.device)
            masks = {"full": dict(attention_mask=None, packed_seq_params=full),
                     "window": dict(attention_mask=None, packed_seq_params=window)}
        else:
            full_mask, window_mask = vision_attention_masks(grid_thw, cu_windows, n, x.device)
            masks = {"full": dict(attention_mask=full_mask), "window": dict(attention_mask=window_mask)}
        h = x.unsqueeze(1)  # [s, b=1, h]
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for idx, layer in enumerate(self.decoder.layers):
            kw = masks["full" if idx in v.fullatt_block_indexes else "window"]
            if recompute:  # keep each block's input only; the block runs again in the backward
                from megatron.core import tensor_parallel

                h = tensor_parallel.checkpoint(lambda x_, layer_=layer, kw_=kw: layer_(
                    x_, rotary_pos_emb=freqs, **kw_)[0], False, h)
            else:
                h, _ = layer(h, rotary_pos_emb=freqs, **kw)
        merged = self.merger(h.squeeze(1))
        return merged[torch.argsort(window_index)]


class Qwen25VLModel(_MegatronModule):
    """Vision tower (first PP stage) + GPTModel with multimodal RoPE; images replace their placeholder tokens."""

    def __init__(self, shape: ModelShape, layout, *, dtype: torch.dtype, use_te: bool, pre_process: bool,
                 post_process: bool, make_vocab_size_divisible_by: int = 128, vp_stage: Optional[int] = None,
                 recompute="none"):
        lm = build_gpt(shape.text, layout, dtype=dtype, use_te=use_te, pre_process=pre_process,
                       post_process=post_process, vp_stage=vp_stage, recompute=recompute,
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        super().__init__(config=lm.config)
        self.shape = shape
        self.pre_process, self.post_process = pre_process, post_process
        self.language_model = lm
        # The pipeline schedules and finalize_model_grads read these from the outermost module.
        self.model_type = lm.model_type
        self.share_embeddings_and_output_weights = lm.share_embeddings_and_output_weights
        self.vision_model = None
        if pre_process and (vp_stage is None or vp_stage == 0):
            vcfg = vision_transformer_config(shape.vision, layout, dtype, use_te, recompute)
            self.vision_model = Qwen25VisionModel(shape.vision, vcfg, use_te)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Optional[Tensor]:
        """The tied word embedding (first stage) or output-layer copy (last stage): megatron-core's
        finalize_model_grads all-reduces its gradient between the two stages so the copies stay equal."""
        return self.language_model.shared_embedding_or_output_weight()

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor],
                pixel_values: Optional[Tensor] = None, image_grid_thw: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, image_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """input_ids [b, s]; position_ids [3, b, s] and image_mask [b, s] (see `mrope_positions_and_image_mask`;
        by default every placeholder token is an image position); returns logits or per-token loss."""
        decoder_input = None
        if self.pre_process:
            emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            sp = self.config.sequence_parallel and pixel_values is not None and self.vision_model is not None
            if sp:  # the embedding comes scattered over TP ranks ([s/TP, b, h]): splice into the whole sequence
                from megatron.core import tensor_parallel

                emb = tensor_parallel.gather_from_sequence_parallel_region(emb, tensor_parallel_output_grad=False)
            if pixel_values is not None and self.vision_model is not None:
                image_embeds = self.vision_model(pixel_values, image_grid_thw).to(emb.dtype)
                mask = image_mask if image_mask is not None else input_ids == self.shape.image_token_id  # [b, s]
                if int(mask.sum()) != image_embeds.shape[0]:
                    raise ValueError(f"{int(mask.sum())} image positions but {image_embeds.shape[0]} image "
                                     f"embeddings; the prompt and image_grid_thw disagree")
                # Image embeddings come batch-major, in token order.
                order = mask.reshape(-1).nonzero().squeeze(1)
                b, s = input_ids.shape
                flat = emb.transpose(0, 1).reshape(b * s, -1).clone()
                flat[order] = image_embeds
                emb = flat.reshape(b, s, -1).transpose(0, 1).contiguous()
            if sp:  # (the backward all-gathers the gradient: every rank's vision tower sees all of it)
                emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
            decoder_input = emb
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=decoder_input, labels=labels, **kwargs)
