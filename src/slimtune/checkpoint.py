"""Atomic, resumable checkpoints: method state + optimizer + scheduler + RNG + data position.

Layout of ``<run>/checkpoint/``: ``method/`` (the method's own save), ``optimizer.pt`` and ``scheduler.pt``
(plain tensors and numbers; read back with ``torch.load(weights_only=True)``), ``rng.safetensors`` and
``trainer_state.json``. A new checkpoint is written beside the old one and swapped in by rename.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimtune.methods.base import Adapted

CKPT = "checkpoint"


def save_checkpoint(run_dir: Path, adapted: Adapted, optimizer, scheduler, state: dict) -> Path:
    final = run_dir / CKPT
    tmp = run_dir / f".{CKPT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    adapted.save(tmp / "method")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    state = {**state, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    old = run_dir / f".{CKPT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(run_dir: Path, adapted: Adapted, optimizer, scheduler) -> dict:
    ckpt = run_dir / CKPT
    adapted.load(ckpt / "method")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=_cuda_index)]
        if states:
            torch.cuda.set_rng_state_all(states)
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    v, internal, gauss = state.pop("python_rng")
    random.setstate((v, tuple(internal), gauss))
    return state


def _cuda_index(key: str) -> int:
    """``cuda10`` -> 10: RNG states are restored in device order (a plain sort puts cuda10 before cuda2)."""
    return int(key.removeprefix("cuda"))


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CKPT / "trainer_state.json").is_file()
