"""GGUF export: a merged HF model directory → one ``.gguf`` file, written by llama.cpp's own converter.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` package and the ``gguf-py`` it is released with)
is what llama.cpp, Ollama and LM Studio users run; it knows each architecture's tensor names and tokenizer
layout. It is not published as a package of its own, so ``scripts/get-llama-convert.sh`` (run by
``make setup-extras``) takes it from the llama-cpp-python source distribution on PyPI (which vendors llama.cpp)
into ``<venv>/share/slimtune/llama.cpp``; ``SLIMTUNE_LLAMA_CPP`` points at another copy (a llama.cpp checkout).
slimtune runs it in a subprocess and checks the result with the ``gguf`` package's reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slimtune.core.errors import UserError

QUANTS = ("f16", "bf16", "q8_0", "f32")
"""Output types: the converter writes them directly and transformers reads them back (dequantizing)."""
ENV = "SLIMTUNE_LLAMA_CPP"
INSTALL = "make setup-extras"


def converter_dir() -> Path:
    """Where llama.cpp's converter is: ``$SLIMTUNE_LLAMA_CPP``, else the copy ``make setup-extras`` installs."""
    return Path(os.environ.get(ENV) or Path(sys.prefix) / "share" / "slimtune" / "llama.cpp")


def converter_script() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(
            f"export --format gguf: llama.cpp's converter is not at '{script}'; install it with `{INSTALL}` "
            f"(or set {ENV} to a llama.cpp checkout)"
        )
    return script


def write_gguf(hf_dir: Path, out_file: Path, quant: str = "f16") -> Path:
    """Convert the HF model in ``hf_dir`` into ``out_file`` (written under a temporary name, renamed when the
    reader accepts it). A converter failure is one :class:`UserError` with its last message."""
    if quant not in QUANTS:
        raise UserError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    script = converter_script()
    tmp = out_file.with_name(out_file.name + ".partial")
    here = script.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here / "gguf-py"), str(here)])}
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", quant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise UserError(
            f"export --format gguf: llama.cpp's converter failed: {lines[-1] if lines else proc.returncode}"
        )
    summary = describe(tmp)
    if not summary["tensors"]:
        tmp.unlink(missing_ok=True)
        raise UserError(f"export --format gguf: the converter wrote no tensors into '{tmp}'")
    os.replace(tmp, out_file)
    return out_file


def describe(path: Path) -> dict:
    """What the ``gguf`` package's reader sees in ``path``: architecture, tensor count, tensor types."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "tensors": len(reader.tensors), "types": types}
