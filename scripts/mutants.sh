#!/usr/bin/env bash
# Mutation testing of the algorithm core against the unit tier (mutmut; not part of CI: ~15-25 min on 2 cores).
#
#   bash scripts/mutants.sh                      # the five core modules
#   bash scripts/mutants.sh megatron_spark/recycle.py
#
# mutmut rewrites each function of the listed modules many ways (operators, constants, dropped calls) and runs the
# unit tests that reach that function against every mutant: a mutant the tests still pass on "survived", i.e. the
# tests would not notice that bug. Runs in a scratch copy of the tracked tree (MUTANTS_DIR, default
# /tmp/megatron-spark-mutants), so the work tree is never touched. Prints the score per module at the end; list
# one module's survivors with `cd $MUTANTS_DIR && .venv/bin/mutmut results` and show one with `mutmut show NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
"$PY" -c "import mutmut" 2>/dev/null || "$ROOT/.venv/bin/pip" install -q "mutmut==3.8.1"
MODULES=("$@")
[[ ${#MODULES[@]} -gt 0 ]] || MODULES=(megatron_spark/algorithm.py megatron_spark/recycle.py megatron_spark/reward.py
                                       megatron_spark/bridge/planner.py megatron_spark/mapping/transforms.py)
WORK=${MUTANTS_DIR:-/tmp/megatron-spark-mutants}
rm -rf "$WORK"
mkdir -p "$WORK"
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$WORK"
{
  echo "[mutmut]"
  echo "source_paths=megatron_spark"
  echo "only_mutate="
  for m in "${MODULES[@]}"; do echo "    $m"; done
  echo "pytest_add_cli_args_test_selection=tests/unit"
  printf 'also_copy=\n    examples\n    tools\n    scripts\n    slurm\n    bench\n    Makefile\n    README.md\n'
  printf 'pytest_add_cli_args=\n    -p\n    no:cacheprovider\n'  # one argument per line
} > "$WORK/setup.cfg"
cd "$WORK"
ln -s "$ROOT/.venv" .venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
# mutmut forks a worker per mutant from a process that already ran torch: with torch's OpenMP pool alive the forked
# child can deadlock in the first parallel op, and mutmut then reports a "timeout" that says nothing about the tests
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# mutmut's own progress line is long; keep its last status and the summary
.venv/bin/mutmut run --max-children "${MUTMUT_JOBS:-2}" 2>&1 | tr '\r' '\n' | tail -n 3
.venv/bin/mutmut results --all true > results.txt 2>&1 || true
"$PY" - "${MODULES[@]}" <<'EOF'
import collections
import sys

mods = [m[:-3].replace("/", ".") for m in sys.argv[1:]]
counts = collections.defaultdict(collections.Counter)
for line in open("results.txt"):
    if ":" not in line:
        continue
    name, status = (s.strip() for s in line.rsplit(":", 1))
    mod = next((m for m in mods if name.startswith(m + ".")), None)
    if mod:
        counts[mod][status] += 1
print(f"{'module':<36} {'mutants':>8} {'killed':>7} {'survived':>9} {'timeout':>8} {'no tests':>9} {'score':>6}")
for m in mods:
    c = counts[m]
    total = sum(c.values())
    killed = c["killed"] + c["timeout"]
    print(f"{m:<36} {total:>8} {c['killed']:>7} {c['survived']:>9} {c['timeout']:>8} {c['no tests']:>9} "
          f"{killed / max(total, 1):>6.1%}")
EOF
