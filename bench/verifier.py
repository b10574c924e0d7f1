#!/usr/bin/env python
"""Our verifier against math-verify's own test cases, with each verifier option and all of them.

    python bench/verifier.py [--out runs/verifier]

The cases are the (gold, prediction, expected) rows of the parametrized tests in math-verify's source distribution
(`pip download --no-binary :all: math-verify==<installed>`, cached in .cache/math-verify; an install step, never at
training time). Our verifier reads only a response's boxed answer, so the population is every row whose
prediction carries a `\\boxed{}`, plus every row whose prediction is a single text-free answer (no words outside
LaTeX commands), asked as if boxed. Rows whose expectation depends on a math-verify setting we do not have
(strict mode, set-relation comparison, a float precision other than the default) are left out. A gold with
several boxes is the set of its boxes.

Prints (and writes OUT/verifier.md) the agreement per configuration and every remaining disagreement.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_spark.reward import VerifierConfig, extract_all_boxed, score  # noqa: E402

CONFIGS = {"seed (defaults)": VerifierConfig(),
           "all_boxed": VerifierConfig(all_boxed=True),
           "decimal_comma": VerifierConfig(decimal_comma=True),
           "numeric_rel_tol=1e-2": VerifierConfig(numeric_rel_tol=1e-2),
           "all three": VerifierConfig(all_boxed=True, decimal_comma=True, numeric_rel_tol=1e-2)}


@dataclass(frozen=True)
class Case:
    test: str
    gold: str
    pred: str
    expected: bool

    @property
    def response(self) -> str:
        """What our verifier reads: the prediction itself when it boxes, else its bare answer as if boxed."""
        return self.pred if "\\boxed" in self.pred else "\\boxed{" + strip_delimiters(self.pred) + "}"

    @property
    def gold_answer(self) -> str:
        boxes = extract_all_boxed(self.gold)
        return ", ".join(boxes) if boxes else strip_delimiters(self.gold)


def strip_delimiters(s: str) -> str:
    s = s.strip()
    for a, z in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(z) and len(s) > len(a) + len(z):
            return s[len(a):-len(z)].strip()
    return s


def text_free(s: str) -> bool:
    return re.search(r"[A-Za-z]{2,}", re.sub(r"\\[a-zA-Z]+", "", s)) is None


def sources(cache: Path) -> Path:
    """math-verify's test folder, from its sdist (the installed version), downloaded once."""
    v = version("math-verify")
    tests = cache / f"math_verify-{v}" / "tests"
    if tests.is_dir():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"math-verify=={v}", "-d", str(cache)], check=True)
    with tarfile.open(next(cache.glob(f"math_verify-{v}.tar.gz"))) as t:
        t.extractall(cache, filter="data")
    return tests


def load_cases(tests: Path) -> tuple[list[Case], int]:
    """The population (module docstring) and the number of parametrized rows read."""
    rows = []
    for f in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for d in node.decorator_list:
                if not (isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize"):
                    continue
                try:  # (rows built with f-strings or calls are not literals: skipped)
                    names, values = ast.literal_eval(d.args[0]), ast.literal_eval(d.args[1])
                except ValueError:
                    continue
                names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
                rows += [(f"{f.stem}::{node.name}", dict(zip(names, v if isinstance(v, tuple) else (v,))))
                         for v in values]
    cases = []
    for test, r in rows:
        expected = r.get("expected", r.get("result"))
        extra = set(r) - {"gold", "pred", "expected", "result"}
        if extra - {"precision"} or r.get("precision", 6) != 6 or not isinstance(expected, (bool, int)):
            continue
        if "\\boxed" in r["pred"] or text_free(r["pred"]):
            cases.append(Case(test, r["gold"], r["pred"], bool(expected)))
    return cases, len(rows)


def why(c: Case) -> str:
    """A one-phrase reason for a remaining disagreement (each checked by reading the case)."""
    if len(extract_all_boxed(c.gold)) > 1 and not c.expected:
        return "a gold with several boxes is read as their set here; math-verify reads its last box"
    if c.expected and "\\boxed" in c.pred:
        return ("the final answer is stated after the last box, unboxed (math-verify also reads 'the final answer "
                "is ...'; we read boxes only)")
    if c.expected:
        return "an equivalence math-verify decides and we do not"
    return "we accept what math-verify rejects"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/verifier")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "math-verify"))
    a = ap.parse_args()
    cases, rows = load_cases(sources(Path(a.cache)))
    t0 = time.time()
    got = {name: [score(c.response, c.gold_answer, cfg) == float(c.expected) for c in cases]
           for name, cfg in CONFIGS.items()}
    boxed = [("\\boxed" in c.pred) for c in cases]
    lines = [f"math-verify {version('math-verify')}: {rows} parametrized rows, {len(cases)} in the population "
             f"({sum(boxed)} boxed, {len(cases) - sum(boxed)} bare text-free answers); "
             f"{sum(c.expected for c in cases)} expected equal. {time.time() - t0:.1f} s for all configurations.", "",
             "| verifier | agrees | of | boxed rows | bare rows | accepts what math-verify rejects |",
             "|---|---|---|---|---|---|"]
    for name, ok in got.items():
        false_pos = sum(1 for c, k in zip(cases, ok) if not k and not c.expected)
        lines.append(f"| {name} | {sum(ok)} | {len(cases)} | {sum(k for k, b in zip(ok, boxed) if b)} | "
                     f"{sum(k for k, b in zip(ok, boxed) if not b)} | {false_pos} |")
    last = list(CONFIGS)[-1]
    lines += ["", f"Remaining disagreements with {last}:", "",
              "| test | gold | prediction (end) | math-verify | ours | why |", "|---|---|---|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for c, ok in zip(cases, got[last]):
        if not ok:
            lines.append(f"| {c.test.split('::')[1]} | `{cell(c.gold[:60])}` | `{cell(c.pred[-70:])}` | "
                         f"{c.expected} | {not c.expected} | {why(c)} |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verifier.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
