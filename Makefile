# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   creates .venv, installs adam_jax, runs examples/demo.py (its MLP check
#               against torch.optim needs torch: make demo-torch installs it, ~900 MB)
#   make test   creates .venv, installs -e ".[test]", runs the whole suite on up to
#               4 pytest-xdist workers (one a core), a test file to a worker
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Each worker is a JAX process of up to ~2.5 GB: more than 4 buys little and costs memory.
# loadfile: a module's tests share one worker, so a module-scoped fixture (the 8-device
# and 2-process subprocess runs, the docs build) runs once, not once a worker.
# --no-loadscope-reorder: modules go out in collection order, the costliest first
# (tests/conftest.py's HEAVY_FIRST), so that no long module runs alone at the end.
PYTEST_XDIST := -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

.PHONY: demo demo-torch test lint format bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[demo]"
	touch $@

# timm (the cautious AdamW reference) goes in without its dependencies, which would pull a
# CUDA torch and torchvision: the tests import timm/optim/adamw.py, which needs only torch.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps timm==1.0.31
	touch $@ $(VENV)/.installed

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[docs]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

# The CPU wheel of torch (about 900 MB installed) for the MLP check against torch.optim.
demo-torch: $(VENV)/.installed
	$(PIP) install "torch==2.13.0"
	$(BIN)/python examples/demo.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_XDIST)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_update.py

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf site $(VENV) .pytest_cache .ruff_cache .hypothesis
