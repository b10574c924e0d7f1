"""The types a sample travels in, from a prompt to the loss:

    Task ──PromptBuilder──▶ BuiltPrompt ──engine──▶ Sample (rollout/engine.py) ──verifier──▶ reward
         ──batching.global_batches──▶ ScoredSample ──batching.dp_share──▶ Rollout (policy.py, in a TrainBatch)
         ──policy.collate──▶ MicroBatch (loss.py) ──▶ GRPOLoss

Every step is a dataclass read by attribute: one sample can be followed by its types alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_spark.kinds import TaskKind


@dataclass
class Task:
    """A prompt to roll out: a data record or a recycled auxiliary task."""
    id: str
    messages: list[dict]
    answer: str
    image: Optional[str]
    question: str
    kind: TaskKind = TaskKind.TASK

    def __post_init__(self):
        self.kind = TaskKind(self.kind)  # (a checkpoint stores the name)

    @classmethod
    def from_example(cls, episode: int, ex) -> "Task":
        """A training record (`data.Example`) of `episode`: its id names both, so ids never repeat over episodes."""
        return cls(f"e{episode}-{ex.index}", ex.messages, ex.answer, ex.image, ex.question)

    @classmethod
    def from_aux(cls, i: str, t, max_pixels: int) -> "Task":
        """A recycled task (`recycle.AuxTask`) as training rolls it out."""
        from megatron_spark.recycle import task_messages

        return cls(i, task_messages(t, max_pixels), t.answer, t.image, t.prompt, t.kind)


@dataclass
class BuiltPrompt:
    """One chat after the chat template and the image processor: the text the engine is given, and the token ids
    (images expanded) and pixels the trainer computes on."""
    prompt: str
    images: Optional[list]           # PIL images for the engine, or None
    input_ids: list[int]
    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None


class PromptCache:
    """Built prompts of a list of tasks, each built once and only when a rank needs it (its engine's share and the
    samples it trains on)."""

    def __init__(self, builder, tasks: list[Task]):
        self.builder, self.tasks = builder, tasks
        self.done: dict[int, BuiltPrompt] = {}

    def __getitem__(self, i: int) -> BuiltPrompt:
        if i not in self.done:
            self.done[i] = self.builder.build(self.tasks[i].messages)
        return self.done[i]

    def select(self, tasks: list[Task], indices: list[int]) -> "PromptCache":
        """The cache of `tasks` (a longer list this cache was not built for) restricted to `indices`: prompts
        already built keep their work (dynamic sampling's kept groups)."""
        out = PromptCache(self.builder, [tasks[i] for i in indices])
        out.done = {k: self.done[i] for k, i in enumerate(indices) if i in self.done}
        return out

    def extend(self, more: "PromptCache") -> None:
        """Append the prompts of `more` (a refill round's) after this cache's tasks, keeping their built work."""
        n = len(self.tasks)
        self.done.update({i + n: b for i, b in more.done.items()})
        self.tasks = self.tasks + more.tasks

    def prompt_mismatches(self, outs: list) -> int:
        """Samples whose prompt tokens (as vLLM saw them) differ from the trainer's, over the prompts built here;
        summed over all ranks (a collective)."""
        n = sum(int(s.prompt_token_ids != b.input_ids) for i, b in self.done.items() for s in outs[i])
        t = torch.tensor([float(n)])
        dist.all_reduce(t)
        return int(t.item())


@dataclass
class ScoredSample:
    """A sample with its reward and advantage, in a global batch: `prompt` indexes the period's tasks."""
    prompt: int
    sample: Any                       # rollout.engine.Sample
    reward: float
    advantage: float

    @property
    def tokens(self) -> int:
        """What it costs to compute: prompt and response tokens."""
        return len(self.sample.prompt_token_ids) + len(self.sample.token_ids)


@dataclass
class Scored:
    """A period's tasks after generation and scoring: per task its prompts' cache entry, its samples, and the
    verifier's reward of every sample (flat, in task order)."""
    tasks: list[Task]
    built: PromptCache
    outs: list[list]                 # per task: its samples (rollout.engine.Sample)
    rewards: list[float]
    metrics: dict = field(default_factory=dict)  # the generation's (and the refills') metrics

    @property
    def samples(self) -> list:
        return [s for g in self.outs for s in g]
