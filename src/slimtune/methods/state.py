"""A method's trained state on disk: a directory with the method's tensors (``Adapted.state_file``, written by
``Adapted.write_tensors``) and ``slimtune_config.json`` (the method config, its JSON-able ``extra_state`` and
what the caller adds: the base model). Checkpoints, ``final/`` and the probes' round trips all go through here;
the tensors a method has are its :meth:`~slimtune.methods.base.Adapted.state_dict`. (``adapted`` is such an
``Adapted``; this module does not import ``base``, which imports it.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.core.errors import UserError
from slimtune.core.files import read_json, read_tensors

STATE_FILE = "method_state.safetensors"
CONFIG_FILE = "slimtune_config.json"


def save(adapted, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write ``adapted``'s tensors and ``slimtune_config.json`` (method config, extra state, ``extra_config``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapted.write_tensors(out)
    meta = {"method": adapted.cfg.to_dict(), "extra_state": adapted.extra_state, **(extra_config or {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return out


def load(adapted, in_dir: str | Path) -> None:
    """Read what :func:`save` wrote into ``adapted``; a damaged file, another method's state or a tensor of the
    wrong shape (another model or settings) is one :class:`UserError` naming the file."""
    in_dir = Path(in_dir)
    meta = read_json(in_dir / CONFIG_FILE)
    saved = meta.get("method", {}).get("name") if isinstance(meta.get("method"), dict) else None
    if saved != adapted.cfg.name:
        raise UserError(f"'{in_dir}': holds the state of method '{saved}', not of '{adapted.cfg.name}'")
    state = read_tensors(in_dir / adapted.state_file)
    check(adapted, state, in_dir / adapted.state_file)
    adapted.load_state_dict(state)
    adapted.extra_state.update(meta.get("extra_state", {}))


def check(adapted, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise a :class:`UserError` naming ``source`` unless ``state`` has exactly ``adapted``'s tensors
    (its ``state_dict``) with their shapes."""
    own = {k: tuple(v.shape) for k, v in adapted.state_dict().items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {own[k]}"
        for k in own
        if k in state and tuple(state[k].shape) != own[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of this method's tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]}, saved vs model)")
    if problems:
        raise UserError(
            f"'{source}': does not fit method '{adapted.cfg.name}' on this model: {'; '.join(problems)} "
            "(saved from another model, method or settings?)"
        )


def require_complete(adapted, state: dict[str, torch.Tensor]) -> None:
    """Raise if ``state`` lacks any tensor ``adapted``'s ``state_dict`` has (a method's ``load_state_dict``)."""
    missing = [n for n in adapted.state_dict() if n not in state]
    if missing:
        raise KeyError(
            f"method '{adapted.cfg.name}' state is missing {len(missing)} tensors, e.g. {missing[:3]}"
        )


def round_trip(adapted, into):
    """``into`` (a fresh ``Adapted`` of the same method and model) after loading what :func:`save` writes of
    ``adapted``, through a temporary directory: what a reload gives, for the probes' and tests' checks."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save(adapted, tmp)
        load(into, tmp)
    return into
