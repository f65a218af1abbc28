PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install: `make` reinstalls only when pyproject.toml is newer (code changes need no
# reinstall, the install is editable).
INSTALLED := $(VENV)/.installed

.PHONY: install test demo check-wheel check-readme compat

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: with no torch present a bare `torch` requirement pulls a multi-GB CUDA build.
# PYTHONWARNINGS=ignore hides setuptools' 8-line "Editable installation" notice from the build backend.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(INSTALLED)

test: install
	$(BIN)/python -m pytest tests

# Rerunnable: the flag replaces the previous demo run (no recipe sets it, so a recipe never replaces a run).
demo: install
	$(BIN)/saq-hf train recipes/demo_mnist_vit_w4a4.yaml --overwrite_output_dir true

# Build sdist + wheel, install the wheel alone into a fresh venv, train 3 steps of the demo and reload it.
check-wheel: install
	.ci/check_wheel

# Fails when the README's demo figures differ from a fresh `make demo` run's saq_run.json.
check-readme: install
	$(BIN)/python scripts/check_readme_demo.py

# The declared version range: a fresh venv at the floors and one at the newest releases, core tests in each
# (benchmarks/results/compat.json). Downloads torch builds from PyPI; about 15 minutes. Run before each release.
compat:
	.ci/compat
