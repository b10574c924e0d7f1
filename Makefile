# The two commands of the README. Each one sets up .venv first (idempotent; ~2 min on a fresh machine).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore

.PHONY: setup run test test-unit test-dist clean

setup:
	@bash scripts/setup_env.sh

run: setup
	$(PY) -m megatron_spark.cli demo

# The sbatch tests need a real SLURM: start it for the run (installing it on first use), stop it afterwards.
test: setup
	@bash scripts/slurm_up.sh || echo "SLURM unavailable: the sbatch tests will be skipped"
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; bash scripts/slurm_down.sh; exit $$rc

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-dist: setup
	$(PY) -m pytest -q tests/dist

clean:
	rm -rf .venv runs .pytest_cache
