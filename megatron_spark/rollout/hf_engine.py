"""A rollout engine on transformers' `generate`, behind the same interface as `RolloutEngine` (`rollout.backend: hf`).

Why: the whole trainer must be runnable on a GPU machine that has CUDA torch and nothing else (no CUDA vLLM), as
verl keeps a transformers rollout for the same reason. It is a smoke lane, not a fast path: one engine per rank
(rollout TP 1), one request at a time, n samples per request through `num_return_sequences`.

What it keeps equal to the vLLM engine, so that the trainer's checks hold unchanged:
- the prompt tokens: the same chat-templated text and the same processor as the trainer's `PromptBuilder`;
- the sampled tokens' log-probs: log-softmax of the raw logits (before temperature / top-p), as vLLM reports them;
- a response ends with (and includes) its EOS token; `finish_reason` is "stop" or "length";
- seeds: each request's samples come from `seed + request index` in a forked RNG, so the trainer's own RNG
  streams (and with them the exact resume) are untouched;
- weights: `update_weights` takes the bridge's 'hf_full' stream (whole HF tensors by checkpoint name).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from megatron_spark.rollout.engine import RolloutRequest, Sample


class HFRolloutEngine:
    def __init__(self, hf_dir: str, *, dtype: str = "float32", max_model_len: int = 1024,
                 device: Optional[torch.device] = None):
        from transformers import AutoProcessor, AutoTokenizer

        from megatron_spark.mapping.table import canonical_hf_name
        from megatron_spark.models.build import default_device
        from megatron_spark.models.hf_config import load_hf_config

        self.device = device or default_device()
        shape = load_hf_config(hf_dir)
        multimodal = shape.multimodal  # (the model class and the processor from one answer)
        cls = shape.kind.hf_model_class()
        self.model = cls.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager")
        self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(hf_dir) if multimodal else None
        self.tokenizer = self.processor.tokenizer if multimodal else AutoTokenizer.from_pretrained(hf_dir)
        self.max_model_len = max_model_len
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos.discard(None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self.params = {canonical_hf_name(n): p for n, p in self.model.named_parameters()}

    def _encode(self, r: RolloutRequest) -> dict:
        if self.processor is None:
            ids = self.tokenizer(r.prompt, return_tensors="pt")
            return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
        return dict(self.processor(text=[r.prompt], images=r.images or None, return_tensors="pt"))

    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int = 256, stop: Optional[list[str]] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> list[list[Sample]]:
        if stop:
            raise ValueError("rollout.backend=hf does not take stop strings; use the vLLM backend")
        out = []
        for k, r in enumerate(requests):
            enc = {key: v.to(self.device) for key, v in self._encode(r).items()}
            prompt_ids = enc["input_ids"][0].tolist()
            budget = min(max_new_tokens, self.max_model_len - len(prompt_ids))
            if budget < 1:
                raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room in rollout.max_model_len="
                                 f"{self.max_model_len}")
            sampling = temperature > 0
            kw = dict(max_new_tokens=budget, do_sample=sampling, num_return_sequences=n, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=self.pad,
                      eos_token_id=None if ignore_eos else sorted(self.eos))
            if sampling:
                kw.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.manual_seed(seed + k)
                res = self.model.generate(**enc, **kw)
            new = res.sequences[:, len(prompt_ids):]
            logp = torch.stack(res.logits, dim=1).float().log_softmax(-1)  # [n, steps, vocab]: raw logits
            samples = []
            for i in range(new.shape[0]):
                ids = new[i].tolist()
                end = next((j + 1 for j, t in enumerate(ids) if t in self.eos), None) if not ignore_eos else None
                ids = ids[:end] if end is not None else ids
                lps = logp[i, torch.arange(len(ids)), torch.tensor(ids, device=logp.device)].tolist()
                text_ids = ids[:-1] if end is not None else ids
                samples.append(Sample(self.tokenizer.decode(text_ids, skip_special_tokens=False), ids, lps,
                                      "stop" if end is not None else "length", prompt_ids))
            out.append(samples)
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Whole HF tensors by checkpoint name (the bridge's 'hf_full' stream), consumed as they arrive."""
        for name, t in named_tensors:
            p = self.params.get(name)
            if p is None:
                raise ValueError(f"rollout.backend=hf: the sync sent {name!r}, which the HF model does not have")
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"rollout.backend=hf: {name} is {tuple(p.shape)} in the model, "
                                 f"{tuple(t.shape)} in the sync")
            p.copy_(t.to(p.dtype))

    def inplace_targets(self):
        raise ValueError("rollout.backend=hf takes whole HF tensors: use rollout.sync_target=hf_full")

    def invalidate_caches(self) -> None:
        """Nothing survives a generate call here (no prefix or encoder caches)."""

    def sleep(self) -> None:
        """Nothing to free: the model is small enough to stay (this backend is for smoke runs)."""

    def wake_up(self, tags=None) -> None:
        pass
