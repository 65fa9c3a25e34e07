"""slimtune: memory- and compute-frugal fine-tuning of Hugging Face causal LMs."""

from __future__ import annotations

__version__ = "0.1.0"

# before anything imports torch: its CPU allocator reads this setting once (slimtune/core/hostmem.py)
from slimtune.core import hostmem as _hostmem  # noqa: I001

_hostmem.enable_huge_pages()

_EXPORTS = {
    "DataConfig": "slimtune.training.config",
    "ModelConfig": "slimtune.training.config",
    "RunConfig": "slimtune.training.config",
    "TrainConfig": "slimtune.training.config",
    "load_config": "slimtune.training.config",
    "METHODS": "slimtune.methods",
    "Adapted": "slimtune.methods",
    "MethodConfig": "slimtune.methods",
    "make_config": "slimtune.methods",
    "apply_method": ("slimtune.methods", "apply"),
    "load_model": ("slimtune.models.loading", "load"),
    "tiny_llama": "slimtune.models.loading",
    "Trainer": "slimtune.training.trainer",
}
"""Imported on first use (PEP 562), so that ``import slimtune.cli`` does not import torch: the ``slimtune`` command
may restart itself on another malloc before anything heavy has run (hostmem.use_allocator)."""


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
    import importlib

    where = _EXPORTS[name]
    module, attr = (where, name) if isinstance(where, str) else where
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = [
    "METHODS",
    "Adapted",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "apply_method",
    "load_config",
    "load_model",
    "make_config",
    "tiny_llama",
]
