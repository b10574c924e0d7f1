"""Held-out evaluation inside training, through the trainer's own rollout engines: greedy task accuracy and
pointwise judge accuracy (balanced Yes/No labels) on a small held-out file, every `eval.interval` steps
(`HeldOutEval`, the component that owns the `eval` section).

Each engine evaluates only its share of the items (`RolloutPlacement.eval_share`: contiguous, as the training
prompts); the counts of the engine leaders are summed over the world, so every rank logs the same numbers."""
from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Optional, Sequence

import torch.distributed as dist

from megatron_spark.data import Example, load_records

from megatron_spark.fixtures.shapes import COLOURS
from megatron_spark.reward import VerifierConfig, score
from megatron_spark.templates import TemplateBank, strip_suffix, with_suffix, with_text

if TYPE_CHECKING:
    from megatron_spark.config import EvalConfig


def load_held_out(path: str, max_items: int, max_pixels: int) -> list[Example]:
    """A training-format file (Spark records) or a benchmark file in the released format."""
    from megatron_spark.evaluation.items import EvalInputError, MathItem, load_items

    try:
        fmt, items = load_items(path, limit=max_items)
    except EvalInputError:
        fmt = None
    if fmt != "spark":
        examples, _ = load_records(path)
        return examples[:max_items]
    out = []
    for i, it in enumerate(items):
        assert isinstance(it, MathItem)
        content: list[dict] = [{"type": "text", "text": with_suffix(it.problem)}]
        if it.image_path:
            content.insert(0, {"type": "image", "image": it.image_path, "max_pixels": max_pixels})
        out.append(Example(i, [{"role": "user", "content": content}], it.answer, it.image_path,
                           with_suffix(it.problem)))
    return out


def _wrong_answer(ex: Example, rnd: random.Random) -> str:
    """A wrong candidate for a judge item: another option of the shapes task, else a perturbed number/string."""
    options = [str(k) for k in range(1, len(COLOURS) + 1)]
    if ex.answer in options:
        return rnd.choice([o for o in options if o != ex.answer])
    try:
        return str(int(float(ex.answer)) + rnd.choice([-2, -1, 1, 2]))
    except ValueError:
        return ex.answer + "0"


def judge_items(examples: Sequence[Example], bank: TemplateBank, seed: int) -> list[tuple[list[dict], str]]:
    """Pointwise yes/no judge prompts: even items with the right answer, odd ones with a wrong one."""
    rnd = random.Random(seed)
    yesno = next(t for t in bank.families["pointwise"] if t.label_type == "yesno")
    items = []
    for i, ex in enumerate(examples):
        right = i % 2 == 0
        cand = ex.answer if right else _wrong_answer(ex, rnd)
        items.append((with_text(ex.messages, yesno.render(question=strip_suffix(ex.question), answer=cand)),
                      "Yes" if right else "No"))
    return items


def held_out_accuracy(engine, prompts, placement, rank: int, examples: Sequence[Example], bank: TemplateBank,
                      max_new_tokens: int, seed: int = 0, verifier: Optional[VerifierConfig] = None) -> dict:
    """{task_accuracy, judge_accuracy} over all examples, greedy; each engine generates its share; answers checked
    as the training rewards check them (`verifier`: the algorithm section's options)."""
    from megatron_spark.rollout.engine import RolloutRequest

    me = placement.engine_of(rank)
    pairs = {"task": [(ex.messages, ex.answer) for ex in examples], "judge": judge_items(examples, bank, seed)}
    counts = []
    for name in ("task", "judge"):
        mine = [pairs[name][i] for i in placement.eval_share(len(pairs[name]), me)]
        built = [prompts.build(m) for m, _ in mine]
        outs = engine.generate([RolloutRequest(b["prompt"], b["images"]) for b in built], n=1, temperature=0.0,
                               max_new_tokens=max_new_tokens)
        counts += [sum(score(o[0].text, gold, verifier or VerifierConfig()) for o, (_, gold) in zip(outs, mine)),
                   len(mine)]
    leader = placement.is_leader(rank)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts if leader else [0.0] * 4)
    total = [sum(c[k] for c in gathered) for k in range(4)]
    return {"task_accuracy": total[0] / max(1, total[1]), "judge_accuracy": total[2] / max(1, total[3]),
            "items": total[1]}


class HeldOutEval:
    """The run's held-out evaluation (the `eval` section): its items, when it is due, and its metrics. Built by
    `train.build_stack` for colocated engines (each rank evaluates through its own engine), given to the trainer's
    loop, which asks `due` after each step."""

    def __init__(self, examples: Sequence[Example], interval: int, engine, prompts, placement, rank: int,
                 templates: TemplateBank, max_new_tokens: int, seed: int, verifier: VerifierConfig):
        self.examples, self.interval = list(examples), interval
        self.engine, self.prompts, self.placement, self.rank = engine, prompts, placement, rank
        self.templates, self.max_new_tokens, self.seed, self.verifier = templates, max_new_tokens, seed, verifier

    @classmethod
    def from_config(cls, ev: "EvalConfig", max_pixels: int, **parts) -> Optional["HeldOutEval"]:
        """None when the section turns it off (`eval.interval: 0`); `parts`: the constructor's other arguments."""
        if not ev.interval:
            return None
        return cls(load_held_out(ev.file, ev.max_items, max_pixels), ev.interval, **parts)

    def due(self, step: int, total_steps: int, last: bool) -> bool:
        """After `step` (1-based): every `interval` steps, and after the run's last step (`last`: it ends early)."""
        return bool(self.examples) and (step % self.interval == 0 or step == total_steps or last)

    def __call__(self) -> dict:
        """The metrics: eval/task_accuracy, eval/judge_accuracy, eval/items and time/eval (a collective)."""
        t0 = time.perf_counter()
        got = held_out_accuracy(self.engine, self.prompts, self.placement, self.rank, self.examples, self.templates,
                                self.max_new_tokens, self.seed, self.verifier)
        return {**{f"eval/{k}": v for k, v in got.items()}, "time/eval": time.perf_counter() - t0}
