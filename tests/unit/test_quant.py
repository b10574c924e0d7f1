"""Quantization: the rollout FP8 quantizer against nvidia-modelopt (bytes and scales), modelopt exports that load
back with small logit changes, and every bad request refused before any work."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_spark.quant.export import FORMATS, check_request, load_dequantized, quantize_hf
from megatron_spark.quant.fp8 import dequantize_fp8, quantizable, quantize_fp8, scale_name
from tests.conftest import ROOT


def exported(d) -> dict:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantizer_equals_modelopt_bytes_and_scales(tiny_models, dtype):
    """Per channel (the rollout format) and per tensor, in bf16 (the division rounds differently) and fp32, with an
    all-zero row: our bytes and scales are modelopt's own (quantize + export_hf_checkpoint)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    for cfg, per_channel in (("FP8_PER_CHANNEL_PER_TOKEN_CFG", True), ("FP8_DEFAULT_CFG", False)):
        m = AutoModelForCausalLM.from_pretrained(tiny_models["q2_tied"], dtype=dtype)
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight[3].zero_()
        src = {k: v.clone() for k, v in m.state_dict().items()}
        loop = None if per_channel else (lambda model: model(torch.tensor([[1, 2, 3, 4, 5]])))
        mtq.quantize(m, getattr(mtq, cfg), forward_loop=loop)
        with tempfile.TemporaryDirectory() as d:
            export_hf_checkpoint(m, export_dir=d)
            ref = exported(Path(d))
        names = [n for n, t in ref.items() if t.dtype == torch.float8_e4m3fn]
        assert len(names) == 14
        for n in names:
            q, s = quantize_fp8(src[n], per_channel)
            assert torch.equal(s, ref[scale_name(n)]), (cfg, n)
            assert torch.equal(q.view(torch.uint8), ref[n].view(torch.uint8)), (cfg, n)
        zero_row = quantize_fp8(src["model.layers.0.mlp.up_proj.weight"], per_channel)
        if per_channel:
            assert zero_row[1][3] == 1.0 and not zero_row[0][3].float().any()


def test_fp8_quantizer_by_hand():
    w = torch.tensor([[448.0, -224.0, 1.0], [0.5, 0.25, -1.0], [0.0, 0.0, 0.0]])
    q, s = quantize_fp8(w)
    assert torch.equal(s, torch.tensor([448.0, 1.0, 0.0]) / 448 + torch.tensor([0.0, 0.0, 1.0]))  # fp32
    assert q[0].float().tolist() == [448.0, -224.0, 1.0]
    assert q[1].float().tolist() == [224.0, 112.0, -448.0]
    assert torch.equal(dequantize_fp8(q, s), torch.tensor([[448.0, -224.0, 1.0], [0.5, 0.25, -1.0], [0, 0, 0.]]))
    q, s = quantize_fp8(torch.tensor([[0.3, 0.1]]))
    assert q.float().tolist() == [[448.0, 144.0]]  # 0.1 * 448 / 0.3 = 149.3 -> nearest e4m3 value is 144
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.zeros(3))


def test_only_the_language_models_linear_weights_are_quantized():
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.3.mlp.down_proj.weight",
           "model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight",
           "language_model.model.layers.0.self_attn.o_proj.weight"]
    no = ["model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight", "lm_head.weight",
          "model.layers.0.input_layernorm.weight", "model.norm.weight", "visual.blocks.0.mlp.gate_proj.weight",
          "model.visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"]
    assert all(quantizable(n) for n in yes) and not any(quantizable(n) for n in no)
    assert scale_name("a.q_proj.weight") == "a.q_proj.weight_scale"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from megatron_spark.fixtures.shapes import make_shapes_task

    return make_shapes_task(tmp_path_factory.mktemp("calib"), 4, seed=0)


# Logits of the dequantized export vs the unquantized model on random tokens (rel = |dz| / |z| over all logits,
# top1 = argmax agreement). The tiny models have random weights, which amplify weight error into logits ~5x; the
# bounds sit ~1.5x above what was measured (docs/quantization.md): a wrong scale, layout or nibble order gives
# rel > 0.9 and top1 < 0.1.
TOLERANCE = {"fp8-per-channel": (0.25, 0.6), "fp8": (0.25, 0.6), "int8-wo": (0.08, 0.85),
             "w4a16-nvfp4": (0.8, 0.3)}


@pytest.mark.parametrize("model", ["q2_tied", "vl_untied", "q3_tied"])
def test_exports_load_in_transformers_close_to_the_unquantized_model(tiny_models, model, calib_file, tmp_path):
    import transformers

    src = tiny_models[model]
    cls = transformers.AutoModelForImageTextToText if model.startswith("vl") else transformers.AutoModelForCausalLM
    ref = cls.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ref(input_ids=ids).logits
    source = exported(Path(src))  # the HF weights under their saved names, as the export names them
    for fmt, (max_rel, min_top1) in TOLERANCE.items():
        rep = quantize_hf(src, tmp_path / fmt, fmt, calib_data=calib_file if fmt == "fp8" else None,
                          calib_prompts=4)
        assert rep.quantized_layers == 14 and rep.calibration_prompts == (4 if fmt == "fp8" else 0)
        cfg = json.loads((rep.out / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == FORMATS[fmt].quant_algo
        assert (rep.out / "tokenizer_config.json").is_file()
        tensors = exported(rep.out)
        assert not any("visual" in n and t.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8)
                       for n, t in tensors.items())
        if fmt == "fp8":
            assert all(tensors[n].item() > 0 for n in tensors if n.endswith("input_scale"))
        if fmt == "fp8-per-channel":  # the export and the rollout engine hold the same FP8 bytes
            for n, t in tensors.items():
                if t.dtype == torch.float8_e4m3fn:
                    assert torch.equal(quantize_fp8(source[n])[0].view(torch.uint8), t.view(torch.uint8)), n
        with torch.no_grad():
            zq = load_dequantized(rep.out)(input_ids=ids).logits
        rel = ((zq - z).norm() / z.norm()).item()
        top1 = (zq.argmax(-1) == z.argmax(-1)).float().mean().item()
        print(f"{model} {fmt}: rel {rel:.4f} top1 {top1:.3f}")
        assert rel < max_rel and top1 > min_top1, (fmt, rel, top1)


def test_int8_export_dequantizes_to_modelopts_own_fake_quantized_model(tiny_models, tmp_path):
    """Weight-only INT8 is computed on CPU by modelopt itself (fake quantization): the export read back through
    load_dequantized gives the same logits (an oracle independent of our dequantizer)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    src = tiny_models["q2_tied"]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    fake = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mtq.quantize(fake, mtq.INT8_WEIGHT_ONLY_CFG, forward_loop=None)
    rep = quantize_hf(src, tmp_path / "int8", "int8-wo")
    with torch.no_grad():
        a, b = fake(input_ids=ids).logits, load_dequantized(rep.out)(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-3


def test_vllm_reads_the_served_formats_quantization_config(tiny_models, tmp_path):
    """vLLM's modelopt config classes parse what we write and refuse W8A16, which it does not serve (its FP8 and
    NVFP4 kernels need CUDA, so loading the weights is a GPU check)."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    for fmt, method in (("fp8-per-channel", "modelopt"), ("w4a16-nvfp4", "modelopt_fp4"), ("int8-wo", "modelopt")):
        rep = quantize_hf(tiny_models["q2_tied"], tmp_path / fmt, fmt)
        qcfg = json.loads((rep.out / "config.json").read_text())["quantization_config"]
        assert "lm_head" in qcfg["ignore"]
        if not FORMATS[fmt].served_by_vllm:
            with pytest.raises(ValueError, match="only supports"):
                get_quantization_config(method).from_config(qcfg)
            continue
        parsed = get_quantization_config(method).from_config(qcfg)
        assert type(parsed).__name__ == {"modelopt": "ModelOptFp8Config", "modelopt_fp4": "ModelOptNvFp4Config"}[
            method]
        if method == "modelopt":
            assert parsed.quant_method == FORMATS[fmt].quant_algo and parsed.is_checkpoint_fp8_serialized


def test_bad_requests_fail_before_any_work(tiny_models, tmp_path, calib_file):
    cfg = json.loads((Path(tiny_models["q2_tied"]) / "config.json").read_text())
    with pytest.raises(ValueError, match=r"--quantize 'fp4': unknown format; choose one of fp8, fp8-per-channel"):
        check_request("fp4", cfg)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="NVFP4 activations .* no GPU .* w4a16-nvfp4"):
            check_request("nvfp4", cfg)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*export unquantized"):
        check_request("fp8-per-channel", dict(cfg, architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match="--calib-data FILE.*fp8-per-channel"):
        check_request("fp8", cfg)
    with pytest.raises(ValueError, match="--calib-data '.*nope.json' is not a file"):
        check_request("fp8", cfg, tmp_path / "nope.json")
    assert check_request("fp8", cfg, calib_file) is FORMATS["fp8"]
    with pytest.raises(ValueError, match="unknown format"):
        quantize_hf(tiny_models["q2_tied"], tmp_path / "out", "fp4")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_megatron_to_hf_quantize_from_a_converted_checkpoint(tiny_models, tmp_path):
    """The CLI from a Megatron checkpoint converted at TP=2: FP8 bytes equal our quantizer on the HF weights; a bad
    format is one error line (exit 2) and writes nothing."""
    from megatron_spark.convert.converters import hf_to_megatron

    src = tiny_models["vl_tied"]
    ckpt = hf_to_megatron(src, tmp_path / "mg", tp=2).out
    tool = [sys.executable, str(ROOT / "tools/convert/megatron_to_hf.py"), "--ckpt", str(ckpt)]
    bad = subprocess.run(tool + ["--out", str(tmp_path / "bad"), "--quantize", "fp4"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown format" in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run(tool + ["--out", str(tmp_path / "q" / "fp8"), "--quantize", "fp8-per-channel"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "fp8-per-channel (FP8_PER_CHANNEL_PER_TOKEN), 14 quantized linear layers" in ok.stdout
    got, hf = exported(tmp_path / "q" / "fp8"), exported(Path(src))
    fp8 = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 14
    for n in fp8:
        q, s = quantize_fp8(hf[n])
        assert torch.equal(q.view(torch.uint8), got[n].view(torch.uint8)) and torch.equal(s, got[scale_name(n)])
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["fp8"]  # no temporary export left behind


@pytest.mark.parametrize("model", ["q2_tied", "vl_untied"])
def test_the_rollout_engines_fp8_checkpoint_is_modelopts_export_streamed(tiny_models, model, tmp_path):
    """What a CUDA FP8 engine starts from is written tensor by tensor through our quantizer, without loading the
    model or modelopt: every tensor, config.json's quantization_config and hf_quant_config.json equal modelopt's
    own fp8-per-channel export of the same directory."""
    from megatron_spark.quant.rollout_checkpoint import write_fp8_checkpoint

    ours = write_fp8_checkpoint(tiny_models[model], tmp_path / "ours")
    ref = quantize_hf(tiny_models[model], tmp_path / "modelopt", "fp8-per-channel").out
    a, b = exported(ours), exported(ref)
    assert sorted(a) == sorted(b) and sum(t.dtype == torch.float8_e4m3fn for t in a.values()) == 14
    for n in a:
        assert same_bytes(a[n], b[n]), n
    for f in ("config.json", "hf_quant_config.json"):
        got, want = (json.loads((d / f).read_text()) for d in (ours, ref))
        if f == "config.json":
            got, want = got["quantization_config"], want["quantization_config"]
        assert got == want, f
    assert (ours / "tokenizer_config.json").is_file()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
