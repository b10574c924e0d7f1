"""CPU support for megatron-core: the only place that bends CUDA assumptions, and only when CUDA is absent.

megatron-core targets GPUs and hard-codes CUDA in a few places that matter for us on CPU (tests, CI, the tiny
demo). Each patch below exists for one measured failure (docs/cpu.md); none touches
megatron-core's files, and `install()` is a no-op when `torch.cuda.is_available()`, so GPU runs take the real
CUDA paths.
"""
from __future__ import annotations

import torch

_INSTALLED = False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements in torch calls made by megatron-core.

    Why: `schedules.py` builds `torch.zeros(..., device="cuda")`; the optimizer, grad scaler, clip_grads and
    dist_checkpointing call `.cuda()` / `.to("cuda")`; and the optimizer refuses params whose `.type()` is not
    `torch.cuda.*`. On CPU all of those must quietly stay on the CPU.
    """

    @staticmethod
    def _is_cuda(dev) -> bool:
        if isinstance(dev, torch.device):
            return dev.type == "cuda"
        if isinstance(dev, str):
            return dev.startswith("cuda")
        return isinstance(dev, int) and not isinstance(dev, bool)  # a bare CUDA ordinal

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and self._is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if (i > 0 and self._is_cuda(a)) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _install_cpu_rng_tracker() -> None:
    """Dropout in attention/embeddings forks `get_cuda_rng_tracker()`; the stock tracker reads CUDA RNG state."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            import contextlib

            @contextlib.contextmanager
            def _fork():
                if name not in self.states_:
                    raise Exception(f"cuda rng state {name} is not added")
                saved = torch.get_rng_state()
                torch.set_rng_state(self.states_[name])
                try:
                    yield
                finally:
                    self.states_[name] = torch.get_rng_state()
                    torch.set_rng_state(saved)

            return _fork()

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute (`tensor_parallel.checkpoint`) saves and restores the "CUDA" RNG state around the
    # recomputed forward; on CPU there is none (the CPU state, which it restores too, is the one dropout uses).
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def install() -> bool:
    """Apply the CPU shim once per process. Returns True when it was (or already is) active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    # GlobalMemoryBuffer and ~80 other call sites allocate on `torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Timers and the schedules synchronize the device; there is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    _CudaToCpuMode().__enter__()
    _install_cpu_rng_tracker()
    _INSTALLED = True
    return True
