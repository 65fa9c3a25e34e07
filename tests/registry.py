"""The per-method test lists, read from the method registry (and, for what the capability probes measured, the
committed matrix), so a method registered tomorrow is in every DDP, FSDP, DeepSpeed, fault, resume, export and
plan test without editing a test file. tests/methods/test_registry.py registers one at run time and checks it."""

from __future__ import annotations

from slimtune.capabilities.render import load_matrix
from slimtune.methods import METHODS, sharded_methods, trainer_methods


def trainers() -> list[str]:
    """Every method `slimtune train` runs."""
    return trainer_methods()


def sharded() -> list[str]:
    """Trainer methods that run under FSDP2 and DeepSpeed ZeRO (no ``sharding`` refusal declared)."""
    return sharded_methods()


def with_feature(feature: str) -> list[str]:
    """Trainer methods whose committed capability cell for ``feature`` (e.g. ``merge``) is ``yes``."""
    features = load_matrix()["features"]
    return [m for m in trainer_methods() if features.get(m, {}).get(feature, {}).get("status") == "yes"]


def probe_settings(method: str) -> dict:
    """The settings the capability probes use for ``method`` on tiny models (its registry entry)."""
    return dict(METHODS[method].probe)
