# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned exactly: the CPU wheel on disk, never the CUDA downloads.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gpuattest demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

proto: $(STAMP)
	$(BIN)/python -m proto.generate

clean:
	rm -rf $(VENV) demo-output .mypy_cache .ruff_cache .pytest_cache

# The benchmark suite against its targets; BENCH_ARGS="--quick --json bench.json" etc.
bench: $(STAMP)
	$(BIN)/gpuattest bench $(BENCH_ARGS)
