"""What an evaluation run asks of the model, written into its results and hashed into every results line.

Which protocol filled them is named in the settings (`protocol`, see protocol.py: `trained`, the CLI's default for
a model that carries its training run's prompt_protocol.json, or `paper`). The field defaults below are the SPARK
paper's protocol (the released evaluation scripts): system prompt "You are a helpful
assistant.", the image before the text, the answer-format suffix, greedy decoding, 2048 new tokens, repetition
penalty 1.05. The released scripts left the image size to the server's processor defaults; we pin them (Qwen2.5-VL's
processor defaults: 4 to 16384 patches of 28 x 28 pixels) so two runs compare.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_spark.templates import ANSWER_SUFFIX

MODES = ("plain", "tts")
BACKENDS = ("vllm", "server")


@dataclass(frozen=True)
class GenerationSettings:
    system_prompt: Optional[str] = "You are a helpful assistant."   # None: no system turn (the chat template's)
    suffix: str = ANSWER_SUFFIX
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 2048
    repetition_penalty: float = 1.05
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 16384
    seed: int = 0
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": False} (Qwen3)


@dataclass(frozen=True)
class EvalSettings:
    """Everything that changes what the model is asked or how it answers. Backend, engines and concurrency are
    not here: they change how fast, not what."""
    model: str
    format: str
    protocol: str = "paper"                  # trained | paper (protocol.py); explicit flags may change fields
    mode: str = "plain"
    tts_rounds: int = 2
    votes: int = 1                           # VL-RewardBench: k samples per item (k > 1 samples at temperature)
    vote_temperature: float = 0.2
    swap_seed: int = 1234                    # the seeded order swap / slot of the reward benchmarks
    templates: Optional[str] = None          # judge/reflection template file (TTS and judge tasks)
    judge_prompt: Optional[str] = None       # a reward benchmark's prompt, read from a file (e.g. the official one)
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["generation"]["chat_template_kwargs"]:  # (absent when unused: earlier results keep their hash)
            del out["generation"]["chat_template_kwargs"]
        return out

    @property
    def hash(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def validate(self) -> "EvalSettings":
        g = self.generation
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode '{self.mode}' is unknown; use {' or '.join(MODES)}")
        if self.mode == "tts" and self.format != "spark":
            problems.append(f"--mode tts is for math benchmarks (format spark), not '{self.format}'")
        if self.tts_rounds < 1:
            problems.append(f"--tts-rounds must be >= 1, got {self.tts_rounds}")
        if self.votes < 1:
            problems.append(f"--votes must be >= 1, got {self.votes}")
        if g.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {g.max_tokens}")
        if g.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {g.temperature}")
        if not 0 < g.min_pixels <= g.max_pixels:
            problems.append(f"--min-pixels {g.min_pixels} / --max-pixels {g.max_pixels}: need 0 < min <= max")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts, e.g. "generation.max_tokens: 2048 -> 512"."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) < 60 else s[:57] + "..."
