"""The baselines slimtune's methods are compared with: full fine-tuning, LoRA and QLoRA (both through peft)."""

from slimtune.methods.baselines.apply import (
    FullAdapted,
    LoraAdapted,
    QLoraAdapted,
    apply_full,
    apply_lora,
    apply_qlora,
)
from slimtune.methods.baselines.config import FullConfig, LoraMethodConfig, QLoraMethodConfig

__all__ = [
    "FullAdapted",
    "FullConfig",
    "LoraAdapted",
    "LoraMethodConfig",
    "QLoraAdapted",
    "QLoraMethodConfig",
    "apply_full",
    "apply_lora",
    "apply_qlora",
]
