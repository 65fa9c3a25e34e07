#!/usr/bin/env bash
# llama.cpp's HF -> GGUF converter for `slimtune export --format gguf`, taken from the llama-cpp-python source
# distribution on PyPI (it vendors llama.cpp): convert_hf_to_gguf.py, its conversion/ package and the gguf-py
# released with it, into $VENV/share/slimtune/llama.cpp. Nothing is compiled.
set -euo pipefail
VENV="${VENV:-.venv}"
VERSION="${LLAMA_CPP_PYTHON:-0.3.36}"
DEST="$VENV/share/slimtune/llama.cpp"
if [ -f "$DEST/convert_hf_to_gguf.py" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$tmp"
root="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp" \
  "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py" "$root/LICENSE"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp/$root" "$DEST"
echo "$VERSION" > "$DEST/VERSION"
