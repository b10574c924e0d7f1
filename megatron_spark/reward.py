"""Verifiable 0/1 rewards: the final `\\boxed{}` answer of a response, checked against the gold with math-verify.

Decisions:
- The answer is the content of the brace-balanced `\\boxed{...}`. A response may repeat it (`\\boxed{4}` ... so
  `\\boxed{4}`), but a response whose boxes hold two or more DIFFERENT answers scores 0 (`boxed_answer`): a hedge
  ("`\\boxed{Yes}` or `\\boxed{No}`") or an echoed instruction must not earn the reward of whichever option comes
  last. This is what SPARK's reference verifier does: its greedy regex spans every box and math-verify parses them
  as one set (`\\boxed{No} ... \\boxed{Yes}` reads `No,Yes`), which matches no single gold. (Boxes that are all
  equivalent to the gold, e.g. `\\frac12` and `0.5`, are one answer written twice and score 1.)
The options below are configurable through `VerifierConfig` / the `algorithm` section:
- `\\box{...}` is accepted too (`accept_box_alias`): SPARK's own judge templates ask for `\\box{}` yet its verifier
  only rewarded `\\boxed{}`, silently teaching a format the prompt did not ask for.
- Yes/No/A/B labels compare case-insensitively (`labels_case_insensitive`): `\\boxed{yes}` is a correct verdict;
  the letter/word carries the judgement, not its case.
- Equivalence: labels by normalised string; otherwise math-verify with the gold wrapped in `$...$` (bare LaTeX gold
  parses to nothing), string extraction for letter answers, then a normalised string comparison as fallback.
Options beyond SPARK's verifier, all off by default (measured against math-verify's own test cases:
bench/verifier.py, docs/benchmarks.md):
- `all_boxed`: every box of the response, as a set, against the gold's elements ("find all solutions" answered as
  `\\boxed{1}` and `\\boxed{-2}`; a gold of `1, -2` or of several boxes). Elements are split at top-level
  commas, a leading `x =` is dropped, repeats count once: the one case where different boxes can score 1;
  off by default because intermediate boxes then count as answers.
- `decimal_comma`: `3,5` reads as 3.5 when the other side is a decimal number with a point (never for sets or
  thousands separators, which have no decimal number opposite them).
- `numeric_rel_tol`: two numeric values (numbers, or closed forms such as `\\frac{1}{3}` or `\\sqrt{2}`
  evaluated by sympy) within this relative tolerance are equal: rounded answers such as 0.333 for 1/3.

math-verify's own timeouts use SIGALRM and fail off the main thread, so they are disabled and every check runs in
a `RewardPool` worker process with a hard per-item deadline: a pathological answer costs at most the limit, its
worker is killed and a warm spare takes its place at once (the next spare starts in the background), and the item
scores 0.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Optional, Sequence

LABELS = {"yes", "no", "a", "b", "c", "d", "e"}
# We enforce time limits ourselves (RewardPool); math-verify warns about that on every call otherwise.
for _name in ("math_verify", "math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class VerifierConfig:
    accept_box_alias: bool = True
    labels_case_insensitive: bool = True
    all_boxed: bool = False         # every box, as a set, against the gold's elements
    decimal_comma: bool = False     # 3,5 == 3.5 when the other side has a decimal point
    numeric_rel_tol: float = 0.0    # numeric values equal within this relative tolerance (0 = exact)

    @classmethod
    def from_config(cls, alg) -> "VerifierConfig":
        """The answer-checking options of the `algorithm` config section."""
        return cls(alg.accept_box_alias, alg.labels_case_insensitive, alg.answer_all_boxed, alg.answer_decimal_comma,
                   alg.answer_rel_tol)


def brace_group(text: str, start: int) -> Optional[tuple[str, int]]:
    """Content of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def extract_all_boxed(text: str, accept_box_alias: bool = True) -> list[str]:
    """The contents of every complete `\\boxed{...}` (or `\\box{...}`), in order."""
    pattern = re.compile(r"\\boxed\s*\{|\\box\s*\{" if accept_box_alias else r"\\boxed\s*\{")
    found: list[str] = []
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if not m:
            return found
        got = brace_group(text, m.end() - 1)
        if got is None:
            return found
        found.append(got[0].strip())
        pos = got[1]


def extract_boxed(text: str, accept_box_alias: bool = True) -> Optional[str]:
    """The content of the last complete `\\boxed{...}` (or `\\box{...}`), or None. (What a response *shows*, e.g.
    the answer a recycled judge task quotes; what it is *scored* as is `boxed_answer`.)"""
    boxes = extract_all_boxed(text, accept_box_alias)
    return boxes[-1] if boxes else None


def distinct_boxes(boxes: Sequence[str], labels_case_insensitive: bool = True) -> list[str]:
    """The boxes' contents with repeats (equal after `normalize`; labels in any case, unless case counts) dropped,
    in order."""
    out, seen = [], set()
    for b in boxes:
        key = normalize(b).lower() if labels_case_insensitive and is_label(b) else normalize(b)
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out


def boxed_answer(text: str, accept_box_alias: bool = True) -> Optional[str]:
    """The response's one boxed answer: None when it has no box or boxes holding different answers (a hedge such
    as `\\boxed{Yes} or \\boxed{No}` gives no verdict). The verdict parse of every judge metric."""
    boxes = distinct_boxes(extract_all_boxed(text or "", accept_box_alias))
    return boxes[-1] if len(boxes) == 1 else None


def normalize(ans: str) -> str:
    s = ans.strip()
    prev = None
    while prev != s:  # \text{...}, \mathrm{...}, \textbf{...} wrappers, nested any depth
        prev, s = s, re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"\(?[A-Ea-e]\)?[.:]?", s):  # "(A)", "A.", "A:" -> "A"
        s = re.sub(r"[().:]", "", s)
    return s


def is_label(gold: str) -> bool:
    return normalize(gold).lower() in LABELS


_DECIMAL_COMMA = re.compile(r"-?\d+,(?!\d{3}$)\d+")  # (exactly three digits after it: a thousands separator)
_INTEGER = re.compile(r"-?\d+")
_DECIMAL_POINT = re.compile(r"-?\d*\.\d+")


def _with_decimal_point(a: str, b: str) -> str:
    """`a` with its decimal comma read as a point, when `b` opposite is a decimal number with a point."""
    return a.replace(",", ".") if _DECIMAL_COMMA.fullmatch(a) and _DECIMAL_POINT.fullmatch(b) else a


def numeric_value(ans: str) -> Optional[float]:
    """The answer as a real number: a plain number, or a closed form sympy evaluates (fractions, roots, pi)."""
    s = normalize(ans).replace("\\approx", "").replace("\\dfrac", "\\frac").lstrip("=~")
    if "," in s or "_" in s:  # a list, a thousands separator or a base subscript: not one real number
        return None
    try:
        return float(s)
    except ValueError:
        pass
    try:
        from math_verify import LatexExtractionConfig, parse

        for v in parse(f"${s}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None):
            if hasattr(v, "is_number") and v.is_number and v.is_real:
                return float(v.evalf())
    except Exception:  # not a number
        return None
    return None


def check(pred: Optional[str], gold: str, cfg: VerifierConfig = VerifierConfig()) -> bool:
    """Is the extracted prediction equivalent to the gold answer? (No timeout here: run it in a RewardPool.)"""
    if pred is None or not gold.strip():
        return False
    p, g = normalize(pred), normalize(gold)
    if is_label(gold):
        return p.lower() == g.lower() if cfg.labels_case_insensitive else p == g
    if cfg.decimal_comma:
        p2, g2 = _with_decimal_point(p, g), _with_decimal_point(g, p)
        if (p2, g2) != (p, g):
            pred, gold, p, g = p2, g2, p2, g2
    if p == g:
        return True
    if cfg.numeric_rel_tol > 0:
        a, b = numeric_value(p), numeric_value(g)
        exact = _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g)  # counts are exact: 2017 is not 2016
        if not exact and a is not None and b is not None and abs(a - b) <= cfg.numeric_rel_tol * max(abs(b), 1e-12):
            return True
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig, parse, verify

        extraction = [StringExtractionConfig(), LatexExtractionConfig(), ExprExtractionConfig()]
        gold_parsed = parse(f"${gold}$", extraction_config=extraction, parsing_timeout=None)
        pred_parsed = parse(f"${pred}$", extraction_config=extraction, parsing_timeout=None)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    except Exception:  # a parser crash on odd LaTeX is a wrong answer, never a crashed run
        return False
    return False


def elements(answer: str) -> list[str]:
    """The elements of a set-valued answer: the outer braces dropped, split at top-level commas (a pair `(1, 2)`
    or an interval stays whole), a leading `x =` / `x_1 =` dropped, spacing commands removed."""
    s = re.sub(r"\\(?:qquad|quad)|\\(?:left|right)\b|\\[ ,;!]", " ", answer.strip())
    while True:  # outer {...} or \{...\}
        m = re.fullmatch(r"\\\{(.*)\\\}|\{(.*)\}", s.strip(), re.S)
        if not m or (m.group(2) is not None and brace_group(s.strip(), 0) != (m.group(2), len(s.strip()))):
            break
        s = m.group(1) if m.group(1) is not None else m.group(2)
    parts, depth, cur = [], 0, ""
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    lhs = re.compile(r"^\s*([A-Za-z])(?:_\{?\w+\}?)?\s*=(?!=)")
    names = {m.group(1) if m else None for m in map(lhs.match, parts)}
    # `x_1 = ..., x_2 = ...` are values of one unknown: its name goes; `x = 1, y = 2` keep theirs (no swaps)
    drop = len(names) == 1 and None not in names
    return [y for y in ((lhs.sub("", x) if drop else x).strip() for x in parts) if y]


def check_set(preds: Sequence[str], golds: Sequence[str], cfg: VerifierConfig = VerifierConfig()) -> bool:
    """Each predicted element matches a distinct gold element and none is left over (repeats count once)."""
    unique: list[str] = []
    for x in preds:
        if normalize(x) not in {normalize(u) for u in unique}:
            unique.append(x)
    left = list(golds)
    if len(unique) != len(left):
        return False
    for x in unique:
        hit = next((i for i, g in enumerate(left) if check(x, g, cfg)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def score(response: str, gold: str, cfg: VerifierConfig = VerifierConfig()) -> float:
    """1.0 when the response's boxed answer is the gold, else 0.0. Two or more different boxed answers score 0
    (SPARK's reference reads them as one set), unless each of them is the gold written another way, or
    `all_boxed` reads them as a set answer that equals the gold's set."""
    boxes = extract_all_boxed(response, cfg.accept_box_alias)
    if not boxes:
        return 0.0
    distinct = distinct_boxes(boxes, cfg.labels_case_insensitive)
    if all(check(b, gold, cfg) for b in distinct):
        return 1.0
    if cfg.all_boxed and not is_label(gold):
        gold_boxes = extract_all_boxed(gold, cfg.accept_box_alias)
        golds = [e for b in (gold_boxes or [gold]) for e in elements(b)]
        preds = [e for b in boxes for e in elements(b)]
        if len(golds) > 1 or len(preds) > 1:
            return 1.0 if check_set(preds, golds, cfg) else 0.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Process pool with hard per-item deadlines


def _resolve(fn: Optional[str]):
    """'module:function' -> the function (a picklable way to hand a scorer to a spawned worker); None -> score."""
    if fn is None:
        return score
    import importlib

    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(conn, cfg: VerifierConfig, fn: Optional[str] = None, parent_pid: Optional[int] = None) -> None:
    import signal

    if parent_pid is not None:
        from megatron_spark.lifetime import die_with_parent

        die_with_parent(parent_pid)
    # SLURM signals every process of a job step; the trainer handles SIGUSR1, its helpers must not die of it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    scorer = _resolve(fn)
    scorer("\\boxed{\\frac{1}{2}}", "0.5", cfg)  # import and warm math-verify before taking timed work
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        idx, response, gold = item
        try:
            conn.send((idx, scorer(response, gold, cfg)))
        except Exception:
            conn.send((idx, None))


@dataclass
class PoolStats:
    items: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    worst_item_s: float = 0.0
    replace_wait_s: float = 0.0      # time spent swapping in replacement workers (never waits for a start)


class RewardPool:
    """`workers` processes scoring (response, gold) pairs; any item over `timeout_s` scores 0 and its worker is
    replaced. Deterministic output order; safe to call from any thread. `fn` ('module:function', called as
    fn(response, gold, cfg)) replaces the default 0/1 score, e.g. to return several scores at once; an item that
    times out or raises gets `failed_value`."""

    @classmethod
    def from_config(cls, alg) -> "RewardPool":
        """The training run's pool: the `algorithm` section's workers, timeout and answer-checking options."""
        return cls(alg.reward_workers, alg.reward_timeout_s, VerifierConfig.from_config(alg))

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, cfg: VerifierConfig = VerifierConfig(),
                 fn: Optional[str] = None, failed_value=0.0):
        if workers < 1:
            raise ValueError(f"RewardPool: workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.cfg, self.fn, self.failed_value = timeout_s, cfg, fn, failed_value
        self._ctx = mp.get_context("spawn")  # fork is unsafe in a process that runs torch threads
        started = [self._start() for _ in range(workers + 1)]  # the last one is a warm spare
        self._procs = [self._await_ready(w) for w in started[:workers]]
        self._spare = started[workers]
        self._warming: set[int] = set()   # slots whose replacement worker has not said "ready" yet
        self.stats = PoolStats()

    def _start(self):
        """Start a worker without waiting for it (it imports and warms math-verify, then says "ready")."""
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self.cfg, self.fn, os.getpid()), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    @staticmethod
    def _await_ready(worker, startup_timeout_s: float = 120.0):
        """The worker, once it has imported and warmed math-verify: the per-item deadline then measures the item
        alone, not the interpreter start (seconds on a loaded machine)."""
        proc, conn = worker
        if not conn.poll(startup_timeout_s) or conn.recv() != "ready":
            proc.kill()
            raise RuntimeError(f"RewardPool: a worker did not start within {startup_timeout_s:.0f} s")
        return worker

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list:
        if len(responses) != len(golds):
            raise ValueError(f"RewardPool.score: {len(responses)} responses but {len(golds)} gold answers")
        t0 = time.monotonic()
        out: list[Optional[float]] = [None] * len(responses)
        todo = list(range(len(responses)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item, started)
        while todo or busy:
            for slot in range(len(self._procs)):
                if slot not in busy and slot not in self._warming and todo:
                    i = todo.pop()
                    self._procs[slot][1].send((i, responses[i], golds[i]))
                    busy[slot] = (i, time.monotonic())
            now = time.monotonic()
            deadline = min((start for _, start in busy.values()), default=now + 60.0) + self.timeout_s
            conns = [self._procs[s][1] for s in list(busy) + sorted(self._warming)]
            ready = wait(conns, timeout=max(0.0, deadline - now))
            for slot in sorted(self._warming):  # a replacement that finished warming takes work from now on
                if self._procs[slot][1] in ready:
                    self._await_ready(self._procs[slot])
                    self._warming.discard(slot)
            for slot in list(busy):
                conn = self._procs[slot][1]
                i, start = busy[slot]
                if conn in ready or conn.poll(0):
                    try:
                        _, value = conn.recv()
                    except EOFError:  # the worker died (e.g. recursion crash in a parser): score 0, replace it
                        value = None
                        self._replace(slot)
                    out[i] = self.failed_value if value is None else value
                    del busy[slot]
                    self.stats.worst_item_s = max(self.stats.worst_item_s, time.monotonic() - start)
                elif time.monotonic() - start >= self.timeout_s:
                    out[i] = self.failed_value
                    self.stats.timeouts += 1
                    self.stats.worst_item_s = max(self.stats.worst_item_s, time.monotonic() - start)
                    self._replace(slot)
                    del busy[slot]
        self.stats.items += len(responses)
        self.stats.seconds += time.monotonic() - t0
        return [float(x) for x in out] if self.fn is None else out

    def _replace(self, slot: int) -> None:
        """Kill the slot's worker and hand the slot the warm spare without waiting: if the spare is still warming
        the slot takes no work until it says ready, while the other workers go on; the next spare starts now."""
        t0 = time.monotonic()
        proc, conn = self._procs[slot]
        proc.kill()
        conn.close()
        spare, self._spare = self._spare, self._start()
        self._procs[slot] = spare
        if spare[1].poll(0):
            self._await_ready(spare)
            self._warming.discard(slot)
        else:
            self._warming.add(slot)
        proc.join(timeout=5)
        self.stats.replace_wait_s += time.monotonic() - t0

    def close(self) -> None:
        workers = self._procs + ([self._spare] if getattr(self, "_spare", None) else [])
        self._spare = None
        for proc, conn in workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
        self._procs = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
