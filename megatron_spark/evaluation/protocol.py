"""Evaluation protocols: how an evaluation builds its prompts and samples, named in every report.

- **trained**: exactly as the training run built and sampled its prompts: no system turn of our own (the chat
  template's default, as training), the answer-format suffix, the run's judge/reflection templates, its image bounds,
  its response length, no repetition penalty, and judge votes sampled at its temperature / top-p / top-k. A
  training run writes this into its checkpoint root (`prompt_protocol.json`, copied into every HF export), and
  `megatron-spark eval` of such a model uses it by default: judge scores from prompts the judge was trained on.
- **paper**: the released SPARK evaluation scripts' settings (system prompt "You are a helpful assistant.",
  repetition penalty 1.05, 2048 new tokens, the processor's default image bounds): to compare with the paper's
  tables, and the default for models trained elsewhere.

Explicit generation flags override either protocol; the report then says which fields were changed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_spark.evaluation.settings import GenerationSettings
from megatron_spark.io.prompt_protocol import PROTOCOL_FILE
from megatron_spark.templates import ANSWER_SUFFIX

PROTOCOLS = ("trained", "paper")
PAPER_VOTE_TEMPERATURE = 0.2   # VL-RewardBench's k votes (the benchmark's protocol)
TRAINED_JUDGE_VOTES = 8        # judge votes per item under the trained protocol (AUROC, vote accuracy)


@dataclass(frozen=True)
class TrainedPrompts:
    """How a training run builds and samples prompts (the `trained` protocol)."""
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    min_pixels: int
    max_pixels: int
    templates: Optional[str] = None       # the judge/reflection template file's text; None: the built-in bank
    system_prompt: Optional[str] = None   # None: no system turn (training adds none)
    suffix: str = ANSWER_SUFFIX
    recycled_max_pixels: Optional[int] = None  # the image bound of recycled (judge) prompts, when lower
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)  # data.chat_template_kwargs

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / PROTOCOL_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Optional["TrainedPrompts"]:
        """The protocol stored with a model (a checkpoint root, one of its iterations, or an HF export), or None."""
        d = Path(directory)
        candidates = [d / PROTOCOL_FILE] + ([d.parent / PROTOCOL_FILE] if d.name.startswith("iter_") else [])
        for candidate in candidates:  # (an iter_* directory of a checkpoint: its root's)
            if candidate.is_file():
                return cls(**json.loads(candidate.read_text()))
        return None

    def generation(self, seed: int = 0, judge: bool = False) -> GenerationSettings:
        """Greedy answers with the run's length, image bounds, top-p / top-k and prompts; no repetition penalty.
        `judge`: judge tasks, whose images training bounds by recycling's limit too."""
        max_pixels = self.max_pixels
        if judge and self.recycled_max_pixels:
            max_pixels = min(max_pixels, self.recycled_max_pixels)
        return GenerationSettings(system_prompt=self.system_prompt, suffix=self.suffix, temperature=0.0,
                                  top_p=self.top_p, top_k=self.top_k, max_tokens=self.max_tokens,
                                  repetition_penalty=1.0, min_pixels=min(self.min_pixels, max_pixels),
                                  max_pixels=max_pixels, seed=seed,
                                  chat_template_kwargs=dict(self.chat_template_kwargs))
