PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: with no torch present a bare `torch` requirement pulls a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

test: install
	$(BIN)/python -m pytest tests

demo: install
	$(BIN)/saq-hf train recipes/demo_mnist_vit_w4a4.yaml
