"""The two interfaces of the rollout side, and the types that cross them.

- `Engine`: one rollout engine (vLLM's `RolloutEngine`, transformers' `HFRolloutEngine`, or a stand-in): generate
  samples for requests, take new weights by HF name, sleep and wake around training.
- `Rollouts`: how the trainer reaches its engines, colocated (`rollout/colocated.py`: each rank's own engine) or
  disaggregated (`rollout/remote.py`: engines on ranks of their own). A request is a list of `GenerationPart`s;
  `submit` hands each engine its share and returns a ticket, `collect` returns every engine's `EngineWork` on every
  training rank; `push` brings the engines to the trainer's weights.

Adding a rollout backend means implementing `Engine` (and choosing it in `rollout/build.py`); the trainer, the
held-out evaluation and the weight sync only ever see these two protocols.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch

from megatron_spark.rollout.engine import RolloutRequest, Sample, Sampling


@dataclass
class GenerationPart:
    """One period's prompts in a generation request: `request(i)` builds prompt i, `seed(engine)` is the engine's
    sampling seed, `overrides` replace sampling settings for this part (e.g. greedy for a probe)."""
    n_prompts: int
    request: Callable[[int], RolloutRequest]
    seed: Callable[[int], int]
    overrides: dict = field(default_factory=dict)


@dataclass
class EngineWork:
    """One engine's answer to a generation request: its prompts (indices of the request), their samples, time."""
    prompts: list[int]
    samples: list[list[Sample]]
    seconds: float


@runtime_checkable
class Engine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int = 256, stop: Optional[list[str]] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> list[list[Sample]]:
        """Per request, `n` samples (text, token ids, the engine's log-prob of each token, prompt token ids)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights by HF name (the iterable is consumed lazily), then drop caches of the old ones."""

    def invalidate_caches(self) -> None:
        """Drop every cache computed with the old weights (after an in-place weight write)."""

    def inplace_targets(self) -> tuple[dict[str, torch.Tensor], Any]:
        """This rank's weight tensors and their name map (the bridge's in-place sync; may refuse)."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory while training runs (a no-op where nothing is to gain)."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Bring back what `sleep` freed ("weights", "kv_cache"; default both)."""


@runtime_checkable
class Rollouts(Protocol):
    sampling: Sampling  # how training requests sample (a request's part may override fields)
    sync: Any           # the weight sync (bridge/sync.py's `WeightSync`): its stats are logged

    def submit(self, parts: list[GenerationPart]) -> int:
        """Hand every engine its share of each part's prompts; returns a ticket."""

    def collect(self, ticket: int) -> list[list[EngineWork]]:
        """Per part, every engine's work on `ticket`, on every training rank (a collective)."""

    def push(self) -> None:
        """Bring every engine to the trainer's current weights (all training ranks)."""

    def sleep(self) -> None:
        """Let colocated engines free their memory for training."""

    def close(self) -> None:
        """Stop what the rollouts started (disaggregated engines)."""


def generate_all(rollouts: Rollouts, prompts: Sequence[RolloutRequest] | Callable[[int], RolloutRequest],
                 n_prompts: int, seed: int = 0, **overrides) -> list[list[Sample]]:
    """Every engine generates its share of `n_prompts` prompts (`prompts(i)` builds prompt i, only where it is
    needed) with the rollouts' sampling and `overrides` (e.g. n, temperature); every training rank gets all samples
    in prompt order (a collective)."""
    from megatron_spark.batching import assemble

    request = prompts if callable(prompts) else prompts.__getitem__
    works = rollouts.collect(rollouts.submit([GenerationPart(n_prompts, request, lambda engine: seed, overrides)]))[0]
    return assemble("generate_all", n_prompts, works)[0]
