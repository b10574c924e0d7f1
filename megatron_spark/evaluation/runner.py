"""Run a benchmark file through a backend, one chunk of items at a time, appending one results line per finished
item; a rerun skips what is done.

    pending = items not in the results directory (for these settings), this shard's share
    for chunk in pending:
        replies = backend.chat(requests of the chunk)        # plain: 1 call per item; tts: up to 1 + 2 x rounds
        records = score(replies)                             # math: both scorers in a RewardPool
        store.append(records)                                # flushed and fsynced: a kill loses only the chunk
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_spark.evaluation import reward_bench as rb
from megatron_spark.evaluation.backends import Backend, Reply, conversation
from megatron_spark.evaluation.items import EvalInputError, Item, MathItem
from megatron_spark.evaluation.scoring import SCORE_BOTH
from megatron_spark.evaluation.settings import EvalSettings, differences
from megatron_spark.reflection import default_templates, self_reflect_batch
from megatron_spark.reward import RewardPool, extract_boxed
from megatron_spark.templates import TemplateBank


class ResultStore:
    """`settings.json` plus `results*.jsonl` (one file per shard) in the results directory. Lines carry the item id
    and the settings hash; the last line of an item wins, and an item whose last line is an error is run again."""

    def __init__(self, out: str | Path, settings: EvalSettings, shard: Optional[int] = None, force: bool = False):
        self.dir = Path(out)
        self.settings, self.hash = settings, settings.hash
        self.dir.mkdir(parents=True, exist_ok=True)
        sfile = self.dir / "settings.json"
        if sfile.is_file():
            old = json.loads(sfile.read_text())
            if old.get("hash") != self.hash:
                if not force:
                    diff = "; ".join(differences(old.get("settings", {}), settings.to_dict())) or "unknown"
                    raise EvalInputError(f"--out '{self.dir}' holds results of other settings ({diff}); use a new "
                                         f"--out, or --force to discard the old results")
                for p in self.dir.glob("results*.jsonl"):
                    p.unlink()
        if not sfile.is_file() or force:
            tmp = sfile.with_suffix(f".{socket.gethostname()}.{os.getpid()}.tmp")  # nodes of one --out race here
            tmp.write_text(json.dumps({"hash": self.hash, "settings": settings.to_dict()}, indent=2) + "\n")
            os.replace(tmp, sfile)
        self.path = self.dir / ("results.jsonl" if shard is None else f"results.part{shard}.jsonl")
        self._drop_torn_line()

    def _drop_torn_line(self) -> None:
        """A kill during a write can leave a last line without its newline: cut it, so it is redone."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> dict[str, dict]:
        """The latest record of each item (all shards), for these settings only."""
        out: dict[str, dict] = {}
        for p in sorted(self.dir.glob("results*.jsonl")):
            for line in p.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line of a shard killed mid-write
                if rec.get("settings") == self.hash:
                    out[rec["id"]] = rec
        return out

    def done(self) -> set[str]:
        return {i for i, r in self.records().items() if not r.get("error")}

    def append(self, records: Sequence[dict]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "settings": self.hash}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def pending_items(items: Sequence[Item], done: set[str], shard: int = 0, num_shards: int = 1) -> list[Item]:
    """This shard's items not done yet. Shards split the whole file by position, not the pending list: engines
    start at different times and see different `done` sets, and must still never share an item."""
    return [it for it in items[shard::num_shards] if it.id not in done]


def math_prompt(item: MathItem, s: EvalSettings) -> str:
    """The problem and the answer-format suffix, joined as a training record's prompt is (`with_suffix`)."""
    g = s.generation
    return f"{item.problem.rstrip()}\n{g.suffix}" if g.suffix else item.problem


class Evaluator:
    """Turns chunks of items into result records with one backend and (for math) one scoring pool."""

    def __init__(self, fmt: str, settings: EvalSettings, backend: Backend, pool: Optional[RewardPool] = None):
        self.fmt, self.s, self.backend, self.pool = fmt, settings, backend, pool
        self.bank = TemplateBank.parse(settings.templates)  # (settings hold the template file's text)
        self.judge_prompt = settings.judge_prompt  # the prompt's text (settings hash texts, not paths)

    def run_chunk(self, items: Sequence[Item]) -> list[dict]:
        if self.fmt == "spark":
            return self._math_tts(items) if self.s.mode == "tts" else self._math_plain(items)
        if self.fmt == "judge":
            return self._judge(items)
        build, record = {"vlrb": (lambda it: rb.vlrb_requests(it, self.s, self.judge_prompt), rb.vlrb_record),
                         "rb2": (lambda it: rb.rb2_requests(it, self.s, self.judge_prompt), rb.rb2_record)}[self.fmt]
        per_item = [build(it) for it in items]
        replies = self._chat([r for reqs in per_item for r in reqs])
        out, k = [], 0
        for it, reqs in zip(items, per_item):
            out.append(record(it, replies[k:k + len(reqs)], self.s))
            k += len(reqs)
        return out

    def _chat(self, requests: Sequence[rb.Request]) -> list[Reply]:
        """Each request's reply, in order: one backend call per kind of request (samples, temperature)."""
        replies: list[Optional[Reply]] = [None] * len(requests)
        kinds: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kinds.setdefault((r.n, r.temperature), []).append(i)
        for (n, temperature), idx in kinds.items():
            got = self.backend.chat([requests[i].conversation for i in idx], self.s.generation, n, temperature,
                                    keys=[requests[i].key for i in idx])
            for i, reply in zip(idx, got):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def _judge(self, items: Sequence[Item]) -> list[dict]:
        """Judge tasks: the verdict, the votes, and (items with a gold answer) whether the model solves the
        question, scored as training scores it."""
        per_item = [rb.judge_requests(it, self.s, self.bank) for it in items]
        replies = self._chat([r for reqs in per_item for r in reqs])
        parts, k = [], 0
        for reqs in per_item:
            parts.append(replies[k:k + len(reqs)])
            k += len(reqs)
        solve = [(i, rep.texts[0] if rep.texts else "") for i, (reqs, reps) in enumerate(zip(per_item, parts))
                 for r, rep in zip(reqs, reps) if r.role == "solve"]
        scores = self._score([o for _, o in solve], [items[i].gold for i, _ in solve]) if solve else []
        solved = {i: sc[0] == 1.0 for (i, _), sc in zip(solve, scores)}
        return [rb.judge_record(it, reqs, reps, self.s, solved.get(i))
                for i, (it, reqs, reps) in enumerate(zip(items, per_item, parts))]

    def _score(self, outputs: list[str], golds: list[str]) -> list[tuple[float, float]]:
        if self.pool is None:
            from megatron_spark.evaluation.scoring import score_both

            return [score_both(o, g) for o, g in zip(outputs, golds)]
        return self.pool.score(outputs, golds)

    def _math_plain(self, items: Sequence[MathItem]) -> list[dict]:
        g = self.s.generation
        replies = self.backend.chat([conversation(math_prompt(it, self.s), it.image_path, g.system_prompt)
                                     for it in items], g)
        outputs = [r.texts[0] if r.texts else "" for r in replies]
        scores = self._score(outputs, [it.answer for it in items])
        return [{**_item_fields(it), **_answer_fields(o, sc), "error": r.error}
                for it, r, o, sc in zip(items, replies, outputs, scores)]

    def _math_tts(self, items: Sequence[MathItem]) -> list[dict]:
        g = self.s.generation
        errors: dict[int, str] = {}

        def generate(prompts: list[str], keys: list[tuple[int, Optional[str]]]) -> list[str]:
            replies = self.backend.chat([conversation(p, img, g.system_prompt) for p, (_, img) in zip(prompts, keys)],
                                        g)
            for (i, _), r in zip(keys, replies):
                if r.error:
                    errors.setdefault(i, r.error)
            return [r.texts[0] if r.texts else "" for r in replies]

        judge_t, reflect_t = default_templates(self.bank)
        traces = self_reflect_batch(generate, [it.problem for it in items],
                                    [(i, it.image_path) for i, it in enumerate(items)], self.s.tts_rounds,
                                    judge_t, reflect_t, [math_prompt(it, self.s) for it in items])
        golds = [it.answer for it in items]
        scores = self._score([t.first_output for t in traces] + [t.final_output for t in traces], golds + golds)
        out = []
        for i, (it, t) in enumerate(zip(items, traces)):
            first, final = _answer_fields(t.first_output, scores[i]), _answer_fields(t.final_output,
                                                                                     scores[len(items) + i])
            rounds = [{"judge_output": r.judge_output, "verdict": r.verdict, "accepted": r.accepted,
                       "reflect_output": r.reflect_output, "extracted": r.answer} for r in t.history]
            out.append({**_item_fields(it), **first, "tts_correct": final["correct"],
                        "tts_correct_compat": final["correct_compat"], "tts_extracted": final["extracted"],
                        "accepted": t.accepted, "rounds_used": t.rounds, "rounds": rounds,
                        "final_output": final["output"], "error": errors.get(i)})
        return out


def _item_fields(it: MathItem) -> dict:
    return {"id": it.id, "dataset": it.dataset, "problem": it.problem, "image_path": it.image_path,
            "gold": it.answer}


def _answer_fields(output: str, scores: tuple[float, float]) -> dict:
    extracted = extract_boxed(output)
    return {"output": output, "extracted": extracted, "no_box": extracted is None, "correct": scores[0],
            "correct_compat": scores[1]}


def run(items: Sequence[Item], evaluator: Evaluator, store: ResultStore, chunk_size: int = 32,
        shard: int = 0, num_shards: int = 1, on_chunk: Optional[Callable[[int], None]] = None) -> int:
    """Evaluate this shard's pending items; returns how many were evaluated."""
    todo = pending_items(items, store.done(), shard, num_shards)
    for k in range(0, len(todo), chunk_size):
        chunk = todo[k:k + chunk_size]
        store.append(evaluator.run_chunk(chunk))
        if on_chunk:
            on_chunk(len(chunk))
    return len(todo)


def scoring_pool(fmt: str, workers: int = 2, timeout_s: float = 10.0) -> Optional[RewardPool]:
    """Math answers (benchmarks, and the questions of judge tasks) are checked in worker processes."""
    return RewardPool(workers, timeout_s, fn=SCORE_BOTH, failed_value=(0.0, 0.0)) if fmt in ("spark", "judge") \
        else None
