"""Quantized Hugging Face exports through nvidia-modelopt, for serving a trained SPARK model.

`megatron_to_hf(..., quantize=FORMAT)` (`megatron-spark convert megatron-to-hf --quantize`) first writes the plain HF
export, then `quantize_hf` loads it in transformers, runs modelopt's post-training quantization (calibrating on a few
prompts of a data file where the format has static activation scales) and writes modelopt's unified HF checkpoint:
quantized weights with their scales, `quantization_config` (quant_method "modelopt") in config.json and
hf_quant_config.json, the tokenizer and processor files beside them. vLLM (CUDA) serves FP8, FP8 per channel and NVFP4
checkpoints in this format. The language model's linear layers are quantized; embeddings, the output layer, norms and
the vision tower stay in the export's dtype (as modelopt does for VLMs).

Everything that can be refused is refused by `check_request` before any weight is read. `load_dequantized` builds a
transformers model whose weights are the export's quantized values times their scales -- what a serving engine
computes with -- for checking the export against the unquantized model (tests/unit/test_quant.py).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_spark.convert.output import begin_output, finish_output
from megatron_spark.models.hf_config import parse_hf_config
from megatron_spark.quant.fp8 import dequantize_fp8


@dataclass(frozen=True)
class ExportFormat:
    modelopt_config: str        # the modelopt.torch.quantization preset
    quant_algo: str             # what the checkpoint's quantization_config says
    calibrates_activations: bool  # static activation scales: needs forward passes on real prompts
    needs_cuda: bool
    served_by_vllm: bool
    what: str


FORMATS = {
    "fp8": ExportFormat("FP8_DEFAULT_CFG", "FP8", True, False, True,
                        "FP8 weights and activations, per-tensor scales, static activation scales (Hopper)"),
    "fp8-per-channel": ExportFormat("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", False, False, True,
                                    "FP8 weights with a scale per output channel, activations per token at run "
                                    "time (Hopper; the rollout format)"),
    "w4a16-nvfp4": ExportFormat("W4A16_NVFP4_CFG", "W4A16_NVFP4", False, False, True,
                                "NVFP4 weights (4-bit, a scale per 16 values), bf16 activations (Blackwell)"),
    "nvfp4": ExportFormat("NVFP4_DEFAULT_CFG", "NVFP4", True, True, True,
                          "NVFP4 weights and activations (Blackwell); activation calibration needs CUDA"),
    "int8-wo": ExportFormat("INT8_WEIGHT_ONLY_CFG", "W8A16", False, False, False,
                            "INT8 weights with a scale per output channel, bf16 activations (not served by vLLM's "
                            "modelopt loader)"),
}


def exportable() -> dict[str, str]:
    """Architectures whose modelopt export is tested here, and the transformers class that loads them (each
    family's `modelopt_auto_class`)."""
    from megatron_spark.models.hf_config import families

    return {f.hf_architecture: f.modelopt_auto_class for f in families().values() if f.modelopt_auto_class}


def check_request(fmt: str, hf_config: dict, calib_data: Optional[str | Path] = None) -> ExportFormat:
    """Every reason the export cannot run, as one ValueError naming the flag and the fix, before any work."""
    if fmt not in FORMATS:
        raise ValueError(f"--quantize {fmt!r}: unknown format; choose one of {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    if f.needs_cuda and not torch.cuda.is_available():
        raise ValueError(f"--quantize {fmt}: NVFP4 activations are calibrated with modelopt's CUDA kernels and no "
                         f"GPU is visible; run the export on a GPU node, or use --quantize w4a16-nvfp4 (NVFP4 "
                         f"weights only, works on CPU)")
    archs = hf_config.get("architectures") or []
    if not any(a in exportable() for a in archs):
        raise ValueError(f"--quantize {fmt}: modelopt export is supported here for {', '.join(exportable())}; this "
                         f"model is {archs or hf_config.get('model_type')}; export unquantized (no --quantize)")
    if f.calibrates_activations and calib_data is None:
        raise ValueError(f"--quantize {fmt}: static activation scales are calibrated on real prompts; pass "
                         f"--calib-data FILE (a Spark data file: JSON list with 'message'), or use --quantize "
                         f"fp8-per-channel (per-token activation scales, no calibration)")
    if calib_data is not None and not Path(calib_data).is_file():
        raise ValueError(f"--calib-data '{calib_data}' is not a file")
    try:
        import modelopt.torch.quantization  # noqa: F401
        from modelopt.torch.export import export_hf_checkpoint  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--quantize needs nvidia-modelopt ({e}); pip install nvidia-modelopt==0.47.0 requests "
                         f"huggingface_hub") from None
    return f


@dataclass
class QuantReport:
    out: Path
    format: str
    quantized_layers: int
    calibration_prompts: int
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.out}: {self.format} ({FORMATS[self.format].quant_algo}), {self.quantized_layers} "
                f"quantized linear layers, {self.bytes_written / 1e9:.3f} GB, {self.calibration_prompts} "
                f"calibration prompts, {self.seconds:.1f} s")


def _with_excluded(preset: dict, patterns: tuple[str, ...]) -> dict:
    """A copy of a modelopt preset with the family's full-precision quantizers off (the vision tower), so that
    calibration (static activation scales) sees them in full precision, as the exported model runs them."""
    import copy

    cfg = copy.deepcopy(preset)
    entries = cfg.get("quant_cfg")
    for pattern in patterns:
        if isinstance(entries, list):  # modelopt 0.47: a list of {quantizer_name, cfg | enable}
            entries.append({"quantizer_name": pattern, "enable": False})
        elif isinstance(entries, dict):  # older releases: pattern -> settings
            entries[pattern] = {"enable": False}
    return cfg


def _auto_class(hf_config: dict):
    import transformers

    classes = exportable()
    arch = next(a for a in hf_config["architectures"] if a in classes)
    return getattr(transformers, classes[arch])


def _calibration_loop(model, hf_dir: Path, hf_config: dict, calib_data: Path, n: int):
    """modelopt's forward_loop: the first `n` prompts of a Spark data file, one forward pass each."""
    from megatron_spark.data import PromptBuilder, load_records

    examples, _ = load_records(calib_data)
    if not examples:
        raise ValueError(f"--calib-data '{calib_data}' holds no usable record")
    multimodal = parse_hf_config(hf_config).multimodal
    builder = PromptBuilder(str(hf_dir), multimodal, 4 * 28 * 28, 1024 * 28 * 28)
    batches = [builder.build(ex.messages) for ex in examples[:n]]

    def loop(m):
        with torch.no_grad():
            for b in batches:
                kw = {"input_ids": torch.tensor([b.input_ids], device=m.device)}
                if b.pixel_values is not None:
                    kw.update(pixel_values=b.pixel_values.to(m.device, m.dtype),
                              image_grid_thw=b.image_grid_thw.to(m.device))
                m(**kw)
    return loop, len(batches)


def quantize_hf(hf_dir: str | Path, out: str | Path, fmt: str, *, calib_data: Optional[str | Path] = None,
                calib_prompts: int = 16, force: bool = False) -> QuantReport:
    """An HF directory -> modelopt's quantized HF checkpoint in `out` (written atomically)."""
    t0 = time.time()
    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    f = check_request(fmt, hf_config, calib_data)
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from megatron_spark.logs import quiet_libraries

    quiet_libraries()
    model = _auto_class(hf_config).from_pretrained(str(hf_dir), dtype="auto")
    model.eval()
    if f.needs_cuda:  # modelopt's NVFP4 calibration kernels run on CUDA only
        model.cuda()
    loop, n_calib = (None, 0)
    if f.calibrates_activations:
        loop, n_calib = _calibration_loop(model, hf_dir, hf_config, Path(calib_data), calib_prompts)
    # weight-only formats calibrate from the weights alone (forward_loop=None), which also keeps NVFP4 weights off
    # the CUDA-only fake-quantization kernels
    exclude = parse_hf_config(hf_config).kind.modelopt_exclude()
    mtq.quantize(model, _with_excluded(getattr(mtq, f.modelopt_config), exclude), forward_loop=loop)
    for pattern in exclude:  # (already off through the config; kept for other preset layouts)
        mtq.disable_quantizer(model, pattern)
    tmp = begin_output(out, force)
    try:
        export_hf_checkpoint(model, export_dir=str(tmp))
        for src in sorted(hf_dir.iterdir()):  # tokenizer, processor, chat template, generation config
            if src.is_file() and not (tmp / src.name).exists() and not src.name.endswith(
                    (".safetensors", ".bin")) and src.name != "model.safetensors.index.json":
                shutil.copy2(src, tmp / src.name)
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
        qcfg = json.loads((tmp / "config.json").read_text()).get("quantization_config", {})
        if qcfg.get("quant_algo") != f.quant_algo:  # before the output appears under its name
            raise ValueError(f"modelopt wrote quant_algo {qcfg.get('quant_algo')!r} for --quantize {fmt}, "
                             f"expected {f.quant_algo!r}; this modelopt version is not the one tested (0.47)")
        final = finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layers = sum(1 for m in model.modules() if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False))
    return QuantReport(final, fmt, layers, n_calib, written, time.time() - t0)


# -- reading an export back (the check) ---------------------------------------------------------------------------
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols/2], two e2m1 codes per byte (low nibble first) -> float [rows, cols]."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = _E2M1[codes & 0x7]
    return torch.where(codes >= 8, -values, values)


def dequantize(algo: str, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight `name` as the engine computes with it, from the export's tensors."""
    w = tensors[name]
    s = tensors.get(name + "_scale")
    if s is None:
        return w
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16"):  # int8 values times their scales, like FP8
        return dequantize_fp8(w, s)
    if algo in ("NVFP4", "W4A16_NVFP4"):
        v = _unpack_nvfp4(w)
        block = v.shape[1] // s.shape[1]
        return v * s.float().repeat_interleave(block, dim=1) * tensors[name + "_scale_2"].float()
    raise ValueError(f"no dequantization for quant_algo {algo!r}")


def load_dequantized(qdir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model of the export whose weights are its dequantized values (activations unquantized)."""
    import tempfile

    from safetensors.torch import load_file, save_file

    qdir = Path(qdir)
    raw = json.loads((qdir / "config.json").read_text())
    algo = raw["quantization_config"]["quant_algo"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(qdir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = {n: dequantize(algo, tensors, n).to(dtype).contiguous() for n in tensors
             if not n.endswith(("_scale", "_scale_2", "input_scale", "k_scale", "v_scale"))}
    plain = {k: v for k, v in raw.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory() as d:
        save_file(state, f"{d}/model.safetensors")
        (Path(d) / "config.json").write_text(json.dumps(plain))
        # transformers maps the saved names onto its module tree, as for any checkpoint
        model, info = _auto_class(raw).from_pretrained(d, dtype=dtype, output_loading_info=True)
    missing = [m for m in info["missing_keys"] if "lm_head" not in m]  # tied output layer
    if missing or info["unexpected_keys"]:
        raise ValueError(f"'{qdir}': weights do not fit the model: missing {missing[:3]}, unexpected "
                         f"{list(info['unexpected_keys'])[:3]}")
    return model.eval()
