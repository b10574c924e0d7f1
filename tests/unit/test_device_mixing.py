"""The CPU forgives device mixing, CUDA does not: comparisons against the HF oracle (on the CPU) must move both
sides to one device by construction. A stand-in for a GPU tensor refuses any operation with a host tensor, as CUDA
would, so code that compares without moving fails here too."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils._pytree import tree_flatten


class OnTheGpu(torch.Tensor):
    """A tensor that behaves as if it lived on another device: mixing it with a host tensor raises; `.cpu()` (and
    `.to("cpu")`) bring it back as a plain host tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values())))
        if to_host:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        flat, _ = tree_flatten((args, kwargs))
        if any(type(x) is torch.Tensor and x.dim() > 0 for x in flat):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices")
        return super().__torch_function__(func, types, args, kwargs)


def test_the_stand_in_refuses_mixing():
    gpu, host = torch.ones(3).as_subclass(OnTheGpu), torch.ones(3)
    with pytest.raises(RuntimeError, match="same device"):
        _ = gpu - host
    assert type(gpu.cpu()) is torch.Tensor and torch.equal(gpu.float().cpu() - host, torch.zeros(3))


def test_convert_verify_comparison_moves_the_model_logits_to_the_oracle(monkeypatch):
    """`megatron-spark convert verify` and the parity tests compare Megatron logits (on the GPU) with HF's (CPU)."""
    from megatron_spark.models import parity

    logits = torch.randn(2, 5, 11)
    monkeypatch.setattr(parity, "forward_logits", lambda *a: logits.clone().as_subclass(OnTheGpu))
    monkeypatch.setattr(parity, "to_batch", lambda shape, kw: None)
    shape = SimpleNamespace(text=SimpleNamespace(vocab_size=11))
    inputs = [("text", {"input_ids": torch.zeros(2, 5, dtype=torch.long)})]
    out = parity.compare_logits(None, shape, None, inputs, reference={"text": logits + 0.5})
    assert out["text"]["max_abs_diff"] == pytest.approx(0.5) and out["text"]["argmax_equal"]
