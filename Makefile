# Set-up and checks. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Dev and CI installs pin torch through constraints.txt (the CPU build available locally);
# the package itself declares the range it supports in pyproject.toml.
export NO_MKDOCS_2_WARNING := 1
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: install demo test lint typecheck pytest docs docs-serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[dev,docs,examples,report]"
	touch $(STAMP)

install: $(STAMP)

# Each run of `make demo` writes a new runs/vae_digits/version_N (two runs and their report).
demo: install
	$(BIN)/python examples/vae_digits.py --logdir runs/vae_digits --report
	@echo
	@echo "Open the report printed above (index.html) in a browser. For TensorBoard:"
	@echo "    $(BIN)/tensorboard --logdir runs/vae_digits"
	@echo "then browse to http://localhost:6006 (Scalars and Custom Scalars tabs)."

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

docs: install
	$(BIN)/mkdocs build --strict --quiet

docs-serve: install
	$(BIN)/mkdocs serve

test: lint typecheck docs pytest

bench: install
	$(BIN)/python benchmarks/bench_module_overhead.py
	$(BIN)/python benchmarks/bench_gradient_monitor.py
	$(BIN)/python benchmarks/bench_balancing.py

clean:
	rm -rf $(VENV) site runs lightning_logs .pytest_cache .mypy_cache .ruff_cache
