"""slimtune: memory- and compute-frugal fine-tuning of Hugging Face causal LMs."""
# ruff: noqa: E402 (the allocator setting must come before the imports that import torch)

from __future__ import annotations

__version__ = "0.1.0"

# before anything imports torch: its CPU allocator reads this setting once (slimtune/hostmem.py)
from slimtune import hostmem as _hostmem  # noqa: I001

_hostmem.enable_huge_pages()

from slimtune.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from slimtune.methods import METHODS, Adapted, MethodConfig, make_config
from slimtune.methods import apply as apply_method
from slimtune.models import load as load_model
from slimtune.models import tiny_llama
from slimtune.trainer import Trainer

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
