"""slimtune: memory- and compute-frugal fine-tuning of Hugging Face causal LMs."""

from __future__ import annotations

__version__ = "0.1.0"

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
