# Single entry for people and CI. `make demo` runs the gateway with a demo workload,
# `make test` runs the whole suite (set-up included).
PY := .venv/bin/python
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: setup demo test test-fast lint typecheck bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m gateway demo

lint: setup
	.venv/bin/ruff check gateway tests benchmarks
	.venv/bin/ruff format --check gateway tests benchmarks
	.venv/bin/mypy

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
