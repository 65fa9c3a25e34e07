# slimtune developer and user entry points. Every target does its own set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimtune-setup
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-fast lint style clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) TORCH_CPU=$(TORCH_CPU) bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(BIN)/slimtune train configs/demo/sentiment-lora.yaml

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real and not slow" tests

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

style: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean-venv:
	rm -rf $(VENV)
