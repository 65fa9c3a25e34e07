"""Configs of the baselines: full fine-tuning, LoRA (peft) and QLoRA (peft LoRA on an NF4 base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig

NF4_BACKENDS = ("auto", "bitsandbytes", "torch")


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter of the model is trained."""

    name: ClassVar[str] = "full"
    freeze_embeddings: bool = False
    """Keep the token embeddings (and a tied LM head) frozen."""


@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA through peft: W x + (alpha/r) B A x on the target linears, base frozen."""

    name: ClassVar[str] = "lora"
    r: int = 16
    """Rank of the update."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Above 0 every adapted linear keeps its own dropped copy of its input for backward
    (0.82 GB of SmolLM2's 4.12 GB LoRA peak at 8 × 128); 0 matched 0.05 in quality on the bundled tasks
    (docs/memory.md) and is peft's own default."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt (e.g. [q_proj, v_proj]); 'all-linear' = every linear but the LM head."""

    def check(self) -> list[Problem]:
        out = positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            out.append(("dropout", f"{self.dropout!r} must be in [0, 1)"))
        if not self.target_modules:
            out.append(("target_modules", "must name at least one module"))
        return out


@dataclass
class QLoraMethodConfig(LoraMethodConfig):
    """QLoRA: the decoder's linears stored as NF4 (4-bit) and frozen; LoRA trained on top."""

    name: ClassVar[str] = "qlora"
    double_quant: bool = True
    """Quantize the per-block scales too (≈0.37 bit/param saved)."""
    backend: str = "auto"
    """bitsandbytes | torch | auto (bitsandbytes when it works on this device, else pure-torch NF4)."""

    def check(self) -> list[Problem]:
        return super().check() + choice("backend", self.backend, NF4_BACKENDS)
