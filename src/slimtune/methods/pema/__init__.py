"""PEMA: plug-in external memory adaptation for offsite tuning (Kim et al., NAACL 2024)."""

from slimtune.methods.pema.config import PEMAConfig
from slimtune.methods.pema.data_owner import (
    ExternalMemory,
    PEMAAdapter,
    build_memory,
    gu_lambda,
    mix_log_probs,
    pema_generate,
    train_pema,
)
from slimtune.methods.pema.owner import HeadBundle, Owner
from slimtune.methods.pema.workflow import apply_pema

__all__ = [
    "ExternalMemory",
    "HeadBundle",
    "Owner",
    "PEMAAdapter",
    "PEMAConfig",
    "apply_pema",
    "build_memory",
    "gu_lambda",
    "mix_log_probs",
    "pema_generate",
    "train_pema",
]
