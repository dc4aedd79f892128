# `make run` and `make test` set everything up on a fresh machine: a .venv, torch first, then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and pinned, so nothing else pulls a multi-GB build it does not need.
# On a CUDA machine set TORCH to the matching build, e.g. TORCH="torch==2.13.0 --index-url ...".
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/tuneserve up

test: lint
	$(BIN)/python -m pytest

# Style, formatting, the import contracts that keep the layers apart (pyproject.toml [tool.importlinter]) and
# the types of app/ and worker/ (pyproject.toml [tool.mypy]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	@command -v wrk >/dev/null || apt-get install -y -q wrk  # the load generator bench_jobs drives the API with
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
