"""Files slimtune reads back (checkpoints, saved method state, run directories) and writes durably.

Reading: a missing, truncated or damaged file is one :class:`~slimtune.core.errors.UserError` naming it, never a
traceback from safetensors or json. Tensors come only from safetensors (no pickle from user files).
Writing: ``fsync`` of files and directories, so a rename that publishes a checkpoint follows its contents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from slimtune.core.errors import UserError

if TYPE_CHECKING:  # torch is imported by the callers; reading JSON or YAML does not need it
    import torch


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU), or one UserError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}': no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"'{path}': not a readable safetensors file ({error_text(err)})") from None


def read_text(path: str | Path, what: str = "") -> str:
    """The UTF-8 text of ``path``, or one UserError ("``what`` 'path': ...") for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}'{path}': no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what}'{path}': not UTF-8 text (byte {err.start})") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``, or one UserError naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"'{path}': expected a JSON object, found {type(value).__name__}")
    return value


def sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` by writing a sibling and renaming it (a kill leaves old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_dir(out_dir: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(directory)`` published by rename: ``out_dir`` appears complete or not at all (a previous copy is
    replaced only once the new one is written)."""
    import shutil

    out = Path(out_dir)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    write(tmp)
    for f in tmp.iterdir():
        fsync_file(f)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


def error_text(err: BaseException) -> str:
    """A library error as a short phrase for a one-line message: an OS error's text, else the first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
