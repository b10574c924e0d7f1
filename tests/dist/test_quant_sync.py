"""FP8 rollouts: the bridge's FP8 weights from a Megatron TP=2 model against nvidia-modelopt's FP8 (per channel)
quantization of the same HF tensors, byte for byte: whole HF tensors ('hf_full', the FP8 sync path), vLLM's fused
qkv_proj / gate_up_proj shards at rollout TP 1 and 2, and the dequantized stream sent to engines without FP8 kernels."""
import pytest
import torch

from tests.conftest import torchrun

MODELS = ("q2_untied_gqa4", "vl_tied")


@pytest.fixture(scope="module")
def fp8(tiny_models, tmp_path_factory):
    from safetensors.torch import load_file

    from megatron_spark.quant.export import quantize_hf

    d = tmp_path_factory.mktemp("fp8")
    torchrun("tests/dist/quant_worker.py", str(d / "bridge"), *(tiny_models[m] for m in MODELS), timeout=600)
    res = {}
    for i, m in enumerate(MODELS):
        export = quantize_hf(tiny_models[m], d / f"modelopt_{m}", "fp8-per-channel").out
        ref = {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        runs = {name: [torch.load(d / "bridge" / str(i) / f"{name}_rank{r}.pt") for r in range(2)]
                for name in ("hf_full", "emulated", "vllm_tp1", "vllm_tp2")}
        res[m] = (ref, runs)
    return res


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("model", MODELS)
def test_hf_full_fp8_stream_equals_modelopt_byte_for_byte(fp8, model):
    ref, runs = fp8[model]
    fp8_names = [n for n, t in ref.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8_names) == 7 * 2  # q k v o gate up down, 2 layers: the language model only
    for rank in range(2):
        got = runs["hf_full"][rank]
        assert sorted(got) == sorted(n for n in ref if not n.endswith("input_scale")), rank
        for name, t in ref.items():
            assert same_bytes(got[name], t), (rank, name, got[name].dtype, t.dtype)
        assert all(got[n[:-6] + "weight_scale"].shape == (ref[n].shape[0],) for n in fp8_names)


@pytest.mark.parametrize("model", MODELS)
def test_fused_vllm_shards_quantize_to_modelopt_bytes(fp8, model):
    """Per-channel scales make a shard of rows quantize exactly as its rows of the whole tensor: vLLM's fused qkv and
    gate_up shards at rollout TP 1 and 2, built from the TP=2 trainer by the in-place plan, equal modelopt's q/k/v
    and gate/up FP8 tensors and scales cut and concatenated as vLLM lays them out."""
    ref, runs = fp8[model]
    layers = sorted({n.split(".layers.")[0] + ".layers." + n.split(".layers.")[1].split(".")[0]
                     for n in ref if ".layers." in n and "visual" not in n})
    checked = 0
    for rollout_tp in (1, 2):
        for rank in range(2):
            got = runs[f"vllm_tp{rollout_tp}"][rank]
            r = rank % rollout_tp
            for layer in layers:
                for fused, parts in ((f"{layer}.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                     (f"{layer}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
                    mod = "self_attn" if "qkv" in fused else "mlp"
                    for suffix in ("weight", "weight_scale"):
                        want = torch.cat([ref[f"{layer}.{mod}.{p}.{suffix}"].view(torch.uint8 if suffix == "weight"
                                                                                   else torch.float32)
                                          .chunk(rollout_tp)[r] for p in parts])
                        have = got[f"{fused}.{suffix}"]
                        have = have.view(torch.uint8) if suffix == "weight" else have
                        assert torch.equal(have, want), (rollout_tp, rank, fused, suffix)
                        checked += 1
    assert checked == 2 * 2 * len(layers) * 2 * 2


@pytest.mark.parametrize("model", MODELS)
def test_engines_without_fp8_kernels_get_the_dequantized_fp8_values(fp8, model):
    ref, runs = fp8[model]
    for rank in range(2):
        got = runs["emulated"][rank]
        assert not any(n.endswith("weight_scale") for n in got)
        for name, t in ref.items():
            if t.dtype == torch.float8_e4m3fn:
                want = t.float() * ref[name[:-6] + "weight_scale"][:, None]
                assert got[name].dtype == torch.float32 and torch.equal(got[name], want), name
            elif not name.endswith("_scale"):
                assert torch.equal(got[name], t), name
