"""The repository stands alone and its layering holds (docs/architecture.md, "Import directions").

- No tracked file refers to a path outside the repository (developer notes, absolute paths of this machine).
- The model code, weight tables, low-level I/O, converters and planner import nothing of the trainer; the SPARK
  algorithm core imports no Megatron and no vLLM code. Imports are read with `ast`, function-level ones included.
"""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ("megatron_spark.policy", "megatron_spark.trainer", "megatron_spark.train", "megatron_spark.checkpoint",
           "megatron_spark.demo", "megatron_spark.rollout", "megatron_spark.bridge", "megatron_spark.evaluation",
           "megatron_spark.stack")
LOW_LEVEL = ("models", "families", "mapping", "io", "convert", "planner", "quant", "fixtures")
CORE = ("algorithm", "recycle", "reward", "templates", "reflection", "placement", "diagnostics", "lifetime",
        "watchdog", "period_metrics")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines()]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.slow
def test_no_file_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/|/root/|(?<![\w/.-])(cpu_stack|spark_method|anchors|scaleout|"
                         r"style_anchors|modelopt_cpu)\.md")
    bad = []
    for p in tracked():
        if p.suffix in (".png", ".jpg", ".whl") or not p.is_file() or p == Path(__file__).resolve():
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_docs_name_only_files_that_exist():
    missing = []
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for ref in re.findall(r"`?((?:docs|bench|scripts|slurm|examples|tools)/[\w./-]+\.(?:md|py|sh|sbatch|yaml))",
                              p.read_text()):
            if not (ROOT / ref).exists():
                missing.append(f"{p.name}: {ref}")
    assert not missing, missing


@pytest.mark.parametrize("package", LOW_LEVEL)
def test_models_io_converters_and_planner_know_nothing_of_the_trainer(package):
    bad = {str(p.relative_to(ROOT)): sorted(i for i in imports(p) if i.startswith(TRAINER))
           for p in (ROOT / "megatron_spark" / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("module", CORE)
def test_algorithm_core_imports_no_megatron_or_vllm(module):
    got = imports(ROOT / "megatron_spark" / f"{module}.py")
    bad = sorted(i for i in got if i.split(".")[0] in ("megatron", "vllm", "transformer_engine")
                 or i.startswith(TRAINER + ("megatron_spark.models", "megatron_spark.parallel")))
    assert not bad, bad


@pytest.mark.parametrize("package", ("models", "mapping", "io"))
def test_model_code_reads_files_through_io_not_the_converters(package):
    bad = {str(p.relative_to(ROOT)): sorted(i for i in imports(p) if i.startswith("megatron_spark.convert"))
           for p in (ROOT / "megatron_spark" / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_one_dtype_table():
    """Config dtype names map to torch / HF / vLLM names and sizes in megatron_spark/dtypes.py only: no other module
    spells a table keyed by 'bf16' (five copies had drifted apart before)."""
    bad = []
    for p in (ROOT / "megatron_spark").rglob("*.py"):
        if p.name == "dtypes.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "bf16" for k in node.keys):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_dtype_table_round_trips():
    import torch

    from megatron_spark import dtypes

    for n in dtypes.NAMES:
        t = dtypes.torch_dtype(n)
        assert dtypes.name_of(t) == n and torch.tensor([], dtype=t).element_size() == dtypes.BYTES[n]
        assert getattr(torch, dtypes.hf_name(n)) == t
    with pytest.raises(ValueError, match="choose one of bf16, fp16, fp32"):
        dtypes.torch_dtype("fp8")


def test_model_families_are_asked_not_compared():
    """What differs between families lives in the family objects (`megatron_spark/families/`): no module compares a
    family name, and only the family modules reach a family's own files (`mapping/qwen.py`, `models/qwen.py`)."""
    bad, reach = [], []
    family_files = {"megatron_spark.mapping.qwen", "megatron_spark.models.qwen", "megatron_spark.families.qwen"}
    for p in (ROOT / "megatron_spark").rglob("*.py"):
        module = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Constant) and x.value in ("qwen2", "qwen3", "qwen2_5_vl")
                    for x in [node.left, *node.comparators]):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
            reached = set()
            if isinstance(node, ast.ImportFrom) and node.module:  # from X import Y: X, and X.Y when Y is a module
                reached = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                reached = {a.name for a in node.names}
            if reached & family_files and module not in family_files:
                reach.append(f"{p.relative_to(ROOT)}:{node.lineno}: {sorted(reached & family_files)}")
    assert not bad, bad
    assert reach == [], reach


def test_one_vllm_engine_builder():
    """Training and evaluation make their vLLM engines through `rollout.engine.build_llm` only."""
    bad = []
    for p in (ROOT / "megatron_spark").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "LLM":
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert bad == ["megatron_spark/rollout/engine.py:" + str(next(
        n.lineno for n in ast.walk(ast.parse((ROOT / "megatron_spark/rollout/engine.py").read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LLM"))], bad


def test_the_dtype_table_imports_nothing_of_the_package():
    assert not [i for i in imports(ROOT / "megatron_spark" / "dtypes.py") if i.startswith("megatron_spark")]


def test_no_component_reaches_into_another_ones_private_state():
    """`x._name` on anything but self/cls appears only where third-party internals are patched on purpose
    (megatron-core in cpu_shim.py and compat.py, the version-difference module) and for os._exit; no module imports
    another one's private names."""
    allowed = {"cpu_shim.py", "compat.py"}
    bad = []
    for p in (ROOT / "megatron_spark").rglob("*.py"):
        if p.name in allowed:
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                base = n.value.id if isinstance(n.value, ast.Name) else None
                if base not in ("self", "cls") and (base, n.attr) != ("os", "_exit"):
                    bad.append(f"{p.relative_to(ROOT)}:{n.lineno}: {base}.{n.attr}")
            # nor a private name imported from another of our modules
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("megatron_spark"):
                bad += [f"{p.relative_to(ROOT)}:{n.lineno}: from {n.module} import {a.name}" for a in n.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == [], bad


def test_the_stack_is_typed():
    """RLStack's fields resolve to the real component classes (no Any): what the trainer is given is typed."""
    import typing

    import megatron_spark.stack as stack_module

    ns = {}
    src = ast.parse((ROOT / "megatron_spark" / "stack.py").read_text())
    for node in ast.walk(src):  # the TYPE_CHECKING imports, done for real here
        if isinstance(node, ast.ImportFrom) and node.module.startswith("megatron_spark."):
            mod = __import__(node.module, fromlist=[a.name for a in node.names])
            ns.update({a.name: getattr(mod, a.name) for a in node.names})
    hints = typing.get_type_hints(stack_module.RLStack, globalns={**vars(stack_module), **ns})
    assert typing.Any not in hints.values() and len(hints) == 15
    assert hints["policy"].__name__ == "Policy" and hints["sync"].__name__ == "WeightSync"


def test_checkpoints_load_without_running_code():
    """A checkpoint someone shares must not run code when a run resumes from it: no `torch.load` in the package
    passes weights_only=False, and the RNG state the checkpoints store loads with weights_only=True."""
    import io
    import random

    import torch

    bad = []
    for p in (ROOT / "megatron_spark").rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load" and \
                    any(k.arg == "weights_only" and getattr(k.value, "value", None) is False for k in n.keywords):
                bad.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    assert bad == [], bad
    buf = io.BytesIO()  # (what checkpoint.py saves per rank)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "cuda_tracker": {"x": torch.zeros(3)}},
               buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    random.setstate(state["python"])
