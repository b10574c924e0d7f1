"""Training data: the Spark JSON format, prompts with images, bad-record handling, and the built-in shapes task.

A Spark record is `{"message": "<JSON list of chat messages>", "answer": "<gold>"}`; the user turn holds an
optional image item (`{"type": "image", "image": path, "max_pixels": ...}`) and the text item. Text-only records
(the LLM variant) simply have no image item. Images go through qwen-vl-utils with the configured min/max pixels,
the same for Megatron and for the rollout engine.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_spark.samples import BuiltPrompt



class DataError(ValueError):
    """A bad training record: the message names the record index and what to fix."""


@dataclass
class Example:
    index: int
    messages: list[dict]
    answer: str
    image: Optional[str] = None          # path of the (first) image, carried into recycled tasks
    question: str = ""                   # the user text (with the answer-format suffix)


@dataclass
class LoadReport:
    total: int = 0
    skipped: dict[int, str] = field(default_factory=dict)


def _parse_record(i: int, rec: Any, prompt_key: str, answer_key: str, base: Path) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"record {i}: expected an object with '{prompt_key}' and '{answer_key}', got "
                        f"{type(rec).__name__}")
    if prompt_key not in rec:
        raise DataError(f"record {i}: missing field '{prompt_key}' (set data.prompt_key if it is named otherwise)")
    raw = rec[prompt_key]
    try:
        messages = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise DataError(f"record {i}: field '{prompt_key}' is not valid JSON ({e.msg} at char {e.pos})") from None
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"record {i}: '{prompt_key}' must be a JSON list of chat messages")
    answer = rec.get(answer_key)
    if answer is None or not str(answer).strip():
        raise DataError(f"record {i}: empty or missing '{answer_key}'; every record needs a gold answer")
    image, question = None, ""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            question = content
            continue
        for item in content or []:
            if item.get("type") == "image" or "image" in item:
                path = Path(str(item.get("image", "")))
                if not path.is_absolute():
                    path = base / path
                if not path.is_file():
                    raise DataError(f"record {i}: image file '{item.get('image')}' not found")
                item["image"] = str(path)
                image = image or str(path)
            elif item.get("type") == "text":
                question = item.get("text", "")
    for marker in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
        if marker in question:
            raise DataError(f"record {i}: the question text contains the control token {marker}; images go in an "
                            f"image item, not as text")
    return Example(i, messages, str(answer).strip(), image, question)


def load_records(path: str | Path, prompt_key: str = "message", answer_key: str = "answer",
                 skip_bad: bool = False) -> tuple[list[Example], LoadReport]:
    """All valid examples; a bad record raises DataError naming its index, or is skipped and counted."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"'{p}' is not valid JSON ({e.msg}, line {e.lineno}); it must be a JSON list") from None
    if not isinstance(data, list):
        raise DataError(f"'{p}' must hold a JSON list of records, got {type(data).__name__}")
    report = LoadReport(total=len(data))
    out = []
    for i, rec in enumerate(data):
        try:
            out.append(_parse_record(i, rec, prompt_key, answer_key, p.parent))
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped[i] = str(e)
    return out, report


def _plain_text(messages: list[dict]) -> list[dict]:
    """Messages with list contents (the Spark format's `[{"type": "text", "text": ...}]`) flattened to strings:
    a text model's chat template may only take string contents (SmolLM2's concatenates them)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(c.get("text", "") for c in content if c.get("type", "text") == "text")
        out.append(dict(m, content=content))
    return out


class PromptBuilder:
    """Chat template + images -> (text prompt for the engine, token ids / pixels for Megatron)."""

    @classmethod
    def from_config(cls, data_cfg, hf_dir: str, multimodal: bool) -> "PromptBuilder":
        """The model's tokenizer / processor with the `data` section's image bounds and chat-template arguments."""
        return cls(hf_dir, multimodal, data_cfg.min_pixels, data_cfg.max_pixels, data_cfg.chat_template_kwargs)

    def __init__(self, hf_dir: str, multimodal: bool, min_pixels: int, max_pixels: int,
                 chat_template_kwargs: Optional[dict] = None):
        from transformers import AutoProcessor, AutoTokenizer

        self.multimodal = multimodal
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.template_kwargs = dict(chat_template_kwargs or {})  # e.g. enable_thinking=False (Qwen3)
        self.processor = AutoProcessor.from_pretrained(hf_dir) if multimodal else None
        self.tokenizer = self.processor.tokenizer if multimodal else AutoTokenizer.from_pretrained(hf_dir)

    def _with_pixels(self, messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [dict(c, min_pixels=self.min_pixels, max_pixels=min(self.max_pixels,
                                                                             c.get("max_pixels", self.max_pixels)))
                           if (c.get("type") == "image" or "image" in c) else c for c in content]
            out.append(dict(m, content=content))
        return out

    def build(self, messages: list[dict]) -> BuiltPrompt:
        """The chat as the engine is given it (text, PIL images) and as the trainer computes on it (token ids with
        the images expanded, pixels)."""
        if not self.multimodal:
            text = self.tokenizer.apply_chat_template(_plain_text(messages), tokenize=False,
                                                      add_generation_prompt=True, **self.template_kwargs)
            return BuiltPrompt(text, None, self.tokenizer(text)["input_ids"])
        from qwen_vl_utils import process_vision_info

        msgs = self._with_pixels(messages)
        images, _ = process_vision_info(msgs)[:2]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, **self.template_kwargs)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        return BuiltPrompt(text, images, enc["input_ids"][0].tolist(), enc.get("pixel_values"),
                           enc.get("image_grid_thw"))


def check_lengths(examples: list[Example], builder: PromptBuilder, max_len: int, skip_bad: bool,
                  report: LoadReport) -> list[Example]:
    """Prompts over `max_len` tokens (images included) are errors naming the record, or skipped and counted."""
    keep = []
    for ex in examples:
        n = len(builder.build(ex.messages).input_ids)
        if n > max_len:
            msg = (f"record {ex.index}: prompt is {n} tokens (images included), over data.prompt_max_len="
                   f"{max_len}; raise the limit or shorten the record")
            if not skip_bad:
                raise DataError(msg)
            report.skipped[ex.index] = msg
            continue
        keep.append(ex)
    return keep


@dataclass
class Cursor:
    """Where the data stream is: resumable exactly (saved in checkpoints)."""
    episode: int = 0
    position: int = 0


class PromptStream:
    """Episodes over the examples, shuffled per episode by (seed, episode); batches of `batch_size`."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, cursor: Optional[Cursor] = None):
        if len(examples) < batch_size:
            raise DataError(f"only {len(examples)} usable records for a rollout batch of {batch_size}; lower "
                            f"data.rollout_batch_size or add data")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.cursor = cursor or Cursor()

    @classmethod
    def from_config(cls, dc, prompts: PromptBuilder, seed: int, say: bool = True) -> "PromptStream":
        """The `data` section's training records (loaded, checked against the prompt length, shuffled with
        `seed`); `say`: report skipped records on stderr (the rank that writes)."""
        examples, report = load_records(dc.train_file, dc.prompt_key, dc.answer_key, dc.skip_bad_records)
        examples = check_lengths(examples, prompts, dc.prompt_max_len, dc.skip_bad_records, report)
        if report.skipped and say:
            print(f"data: skipped {len(report.skipped)} of {report.total} records "
                  f"(first: {next(iter(report.skipped.values()))})", file=sys.stderr)
        return cls(examples, dc.rollout_batch_size, seed)

    def _order(self, episode: int) -> list[int]:
        idx = list(range(len(self.examples)))
        random.Random(self.seed * 7919 + episode).shuffle(idx)
        return idx

    @property
    def steps_per_episode(self) -> int:
        return len(self.examples) // self.batch_size

    def state_dict(self) -> dict:
        """Where the stream is (checkpointed): the episode and the position in its shuffled order."""
        return vars(self.cursor).copy()

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor(**state)

    def restart(self) -> None:
        """Back to the first batch of the first episode (after a warm start that read from the stream)."""
        self.cursor = Cursor()

    def next_batch(self) -> tuple[int, list[Example]]:
        if self.cursor.position + self.batch_size > len(self.examples):
            self.cursor = Cursor(self.cursor.episode + 1, 0)
        order = self._order(self.cursor.episode)
        batch = [self.examples[i] for i in order[self.cursor.position:self.cursor.position + self.batch_size]]
        self.cursor = Cursor(self.cursor.episode, self.cursor.position + self.batch_size)
        return self.cursor.episode, batch
