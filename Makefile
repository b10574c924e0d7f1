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

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-dist: setup
	$(PY) -m pytest -q tests/dist

clean:
	rm -rf .venv runs .pytest_cache
