"""Atomic, verified, resumable checkpoints: method state + optimizer + scheduler + RNG + data position.

A checkpoint directory holds ``method/`` (the method's own save), ``optimizer.pt`` and ``scheduler.pt`` (plain
tensors and numbers; read back with ``torch.load(weights_only=True)``), ``rng.safetensors``,
``trainer_state.json`` and, written last, ``manifest.json``: the layout version, the step, the method and base
model, and every file's size and sha256.

A run keeps two: ``<run>/checkpoint`` (the newest) and ``<run>/checkpoint-prev`` (the one before). A save writes
``<run>/.checkpoint.tmp`` (each file fsynced), then rotates by renames: ``checkpoint-prev`` → ``.checkpoint.trash``,
``checkpoint`` → ``checkpoint-prev``, ``.checkpoint.tmp`` → ``checkpoint``. A process killed at any moment leaves
at least one complete checkpoint; :func:`latest_checkpoint` takes the newest one that verifies against its
manifest and warns about a newer one that does not (torn, truncated or edited).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimtune.core.errors import UserError
from slimtune.core.files import (
    error_text,
    fsync_dir,
    fsync_file,
    read_json,
    read_tensors,
    sha256,
    write_durable,
)
from slimtune.methods.base import Adapted

log = logging.getLogger(__name__)

CKPT, PREV, TMP, TRASH = "checkpoint", "checkpoint-prev", ".checkpoint.tmp", ".checkpoint.trash"
MANIFEST = "manifest.json"
LAYOUT = 2
DELAY_ENV = "SLIMTUNE_TEST_SAVE_DELAY_S"
"""Fault-injection tests only: seconds to sleep after each file a save writes (widens the window a kill hits)."""


def save_checkpoint(
    run_dir: Path,
    adapted: Adapted,
    optimizer,
    scheduler,
    state: dict,
    identity: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a checkpoint of ``state`` (``step``, ``data`` position, counters) and publish it atomically.

    ``identity`` (method, base model) goes into the manifest, so resuming with another one is refused.
    ``optimizer_state``: what to save for the optimizer instead of its ``state_dict()`` (FSDP: the gathered one).
    A failed write (disk full, read-only, quota) removes the partial copy, keeps the previous checkpoints and
    raises one :class:`UserError` naming the path.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / TMP
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        opt_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        _write_contents(tmp, adapted, opt_state, scheduler, state)
        _write_manifest(tmp, int(state["step"]), identity or {})
        _rotate(run_dir)
    except Exception as err:
        if not _is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(err, "filename", None) or tmp
        kept = run_dir / CKPT if (run_dir / CKPT).is_dir() else None
        raise UserError(
            f"checkpoint: cannot write '{where}' ({error_text(err)}); "
            + (f"the previous checkpoint '{kept}' is intact" if kept else "no earlier checkpoint exists")
        ) from None
    return run_dir / CKPT


def _write_contents(out: Path, adapted: Adapted, optimizer_state: dict, scheduler, state: dict) -> None:
    adapted.save(out / "method")
    _delay()
    torch.save(optimizer_state, out / "optimizer.pt")
    _delay()
    torch.save(scheduler.state_dict(), out / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(out / "rng.safetensors"))
    py_state = random.getstate()
    state = {**state, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    write_durable(out / "trainer_state.json", json.dumps(state, indent=2))
    _delay()


def _write_manifest(out: Path, step: int, identity: dict) -> None:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(out).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    for d in {p.parent for p in out.rglob("*")} | {out}:
        fsync_dir(d)
    write_durable(
        out / MANIFEST, json.dumps({"layout": LAYOUT, "step": step, **identity, "files": files}, indent=2)
    )


def _rotate(run_dir: Path) -> None:
    final, prev, tmp, trash = (run_dir / n for n in (CKPT, PREV, TMP, TRASH))
    if trash.exists():
        shutil.rmtree(trash)
    if prev.exists():
        prev.rename(trash)
    if final.exists():
        final.rename(prev)
    _delay()
    tmp.rename(final)
    fsync_dir(run_dir)
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(ckpt: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why) where it is missing, malformed or of another layout (no file is hashed)."""
    if not (ckpt / MANIFEST).is_file():
        if (ckpt / "trainer_state.json").is_file():
            return None, "no manifest.json: written by an older slimtune (checkpoint layout 1)"
        return None, "incomplete (no manifest.json)"
    try:
        manifest = read_json(ckpt / MANIFEST)
        if manifest.get("layout") != LAYOUT:
            return None, f"checkpoint layout {manifest.get('layout')!r}, this slimtune reads layout {LAYOUT}"
        manifest["step"] = int(manifest["step"])
        if not isinstance(manifest["files"], dict):
            raise TypeError
    except UserError as err:
        return None, str(err)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, "manifest.json is malformed"
    return manifest, None


def _check_files(ckpt: Path, files: dict) -> str | None:
    """What is wrong with the files the manifest lists (missing, torn, altered), or None."""
    for rel in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng.safetensors"):
        if rel not in files:
            return f"manifest.json does not list {rel}"
    try:
        for rel, info in files.items():
            path = ckpt / rel
            if not path.is_file():
                return f"{rel} is missing"
            size = path.stat().st_size
            if size != info["bytes"]:
                return f"{rel} has {size} bytes where the manifest says {info['bytes']} (a torn write?)"
            if sha256(path) != info["sha256"]:
                return f"{rel} does not match its checksum (damaged or edited)"
    except (KeyError, TypeError):
        return "manifest.json is malformed"
    return None


def verify(ckpt: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a complete checkpoint whose files match its manifest, else (None, what is wrong)."""
    manifest, why = _read_manifest(ckpt)
    why = why or _check_files(ckpt, manifest["files"])
    return (None, why) if why else (manifest, None)


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that verifies, with its manifest; None when the run has none.

    A newer one that fails verification is skipped with a warning naming it and why; if checkpoints exist but
    none verifies, one :class:`UserError`.
    """
    candidates, bad = [], []
    for name in (CKPT, TMP, PREV):  # a kill between two renames leaves the newest one in TMP
        path = Path(run_dir) / name
        if path.is_dir():
            manifest, why = _read_manifest(path)
            if why is None:
                candidates.append((path, manifest))
            else:
                bad.append((path, why))
    found = None
    # newest first (a stable sort: checkpoint before tmp before prev on a tie); hash only until one is good
    for path, manifest in sorted(candidates, key=lambda c: -c[1]["step"]):
        why = _check_files(path, manifest["files"])
        if why is None:
            found = (path, manifest)
            break
        bad.append((path, why))
    if found is None:
        usable = [(p, w) for p, w in bad if p.name != TMP]
        if usable:
            path, why = usable[0]
            raise UserError(f"checkpoint '{path}': {why}; no usable checkpoint to resume from")
        return None
    for path, why in bad:
        if path.name == TMP:
            log.info("discarding an unfinished checkpoint write '%s' (%s)", path, why)
        else:
            log.warning(
                "checkpoint '%s' is unusable (%s); resuming from '%s' (step %d)",
                path,
                why,
                found[0],
                found[1]["step"],
            )
    return found


@dataclass
class Loaded:
    """A checkpoint read by :func:`read_checkpoint`: the trainer state, the optimizer's and scheduler's states
    (applied by :meth:`into`, once the optimizer exists over the placed model) and the RNG states it set."""

    ckpt: Path
    state: dict
    optimizer: dict
    scheduler: dict
    rng: tuple

    def into(self, optimizer, scheduler) -> None:
        try:
            optimizer.load_state_dict(self.optimizer)
            scheduler.load_state_dict(self.scheduler)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(
                f"checkpoint '{self.ckpt}': optimizer state does not fit this run ({error_text(err)})"
            ) from None

    def set_rng(self) -> None:
        cpu, cuda, py = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)


def read_checkpoint(run_dir: Path, adapted: Adapted, identity: dict | None = None) -> Loaded | None:
    """Read the newest good checkpoint: the method's state into ``adapted`` (the whole model, before any
    sharding), the RNGs set; None where the run has no complete checkpoint yet (killed before its first).
    Refused with one line where ``identity`` differs."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    ckpt, manifest = found
    for key, want in (identity or {}).items():
        if manifest.get(key) is not None and manifest[key] != want:
            raise UserError(
                f"checkpoint '{ckpt}': {key} is '{manifest[key]}', this run's config says '{want}'"
            )
    adapted.load(ckpt / "method")
    optimizer, scheduler = _torch_load(ckpt / "optimizer.pt"), _torch_load(ckpt / "scheduler.pt")
    rng = read_tensors(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=_cuda_index)]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = read_json(ckpt / "trainer_state.json")
    v, internal, gauss = state.pop("python_rng")
    random.setstate((v, tuple(internal), gauss))
    # what runs before training resumes (the loss check, the evaluation before) must not shift them
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return Loaded(ckpt, state, optimizer, scheduler, (torch.get_rng_state(), cuda, random.getstate()))


def load_checkpoint(
    run_dir: Path, adapted: Adapted, optimizer, scheduler, identity: dict | None = None
) -> dict | None:
    """Restore the newest good checkpoint into ``adapted``, ``optimizer``, ``scheduler`` and the RNGs; return
    the trainer state (``step``, ``data``, counters), or None where the run has no complete checkpoint yet."""
    loaded = read_checkpoint(run_dir, adapted, identity)
    if loaded is None:
        return None
    loaded.into(optimizer, scheduler)
    return loaded.state


def _torch_load(path: Path):
    """``torch.load`` restricted to tensors and plain containers (no code from the file runs)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # the restricted unpickler's errors, a truncated zip, ...
        raise UserError(f"'{path}': not a readable optimizer/scheduler state ({error_text(err)})") from None


def _cuda_index(key: str) -> int:
    """``cuda10`` -> 10: RNG states are restored in device order (a plain sort puts cuda10 before cuda2)."""
    return int(key.removeprefix("cuda"))


def _is_write_failure(err: Exception) -> bool:
    """An OS-level write failure, also where a serializer wraps it (safetensors, torch.save's zip writer)."""
    if isinstance(err, OSError):
        return True
    text = str(err).lower()
    return type(err).__name__ == "SafetensorError" or (
        isinstance(err, RuntimeError) and ("write" in text or "file" in text)
    )


def _delay() -> None:
    seconds = float(os.environ.get(DELAY_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)
