"""Method registry. A method joins slimtune by adding one ``MethodSpec`` here (and one row to the contract tests)."""

from __future__ import annotations

from torch import nn

from slimtune.errors import UserError
from slimtune.methods.base import Adapted, MethodConfig, MethodSpec, TrainerHooks
from slimtune.methods.lora import (
    FullConfig,
    LoraMethodConfig,
    QLoraMethodConfig,
    apply_full,
    apply_lora,
    apply_qlora,
)
from slimtune.methods.meft import MEFTConfig, apply_meft
from slimtune.methods.pema import PEMAConfig, apply_pema
from slimtune.methods.pst import PSTConfig, apply_pst
from slimtune.methods.qst import QSTConfig, apply_qst
from slimtune.methods.sat import SATConfig, apply_sat

METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", FullConfig, apply_full, "full", "full fine-tuning (every parameter trained)"),
    "lora": MethodSpec("lora", LoraMethodConfig, apply_lora, "adapter", "LoRA via peft (base frozen)"),
    "qlora": MethodSpec(
        "qlora",
        QLoraMethodConfig,
        apply_qlora,
        "quantized",
        "LoRA on an NF4 4-bit frozen base (bitsandbytes or pure-torch NF4)",
    ),
    "qst": MethodSpec(
        "qst",
        QSTConfig,
        apply_qst,
        "quantized",
        "quantized side tuning: 4-bit backbone run without autograd + a d/r-wide side network",
    ),
    "sat": MethodSpec(
        "sat",
        SATConfig,
        apply_sat,
        "full",
        "sparsity-accelerated training: each step omits unimportant MLP channels / heads by slicing weights",
    ),
    "pst": MethodSpec(
        "pst",
        PSTConfig,
        apply_pst,
        "adapter",
        "parameter-efficient sparse training: LoRA update + learned low-rank/structured mask scores, sparse export",
    ),
    "meft": MethodSpec(
        "meft",
        MEFTConfig,
        apply_meft,
        "adapter",
        "wide sparse parallel adapter in host memory: per token top-K neurons, only touched rows on the device",
    ),
    "pema": MethodSpec(
        "pema",
        PEMAConfig,
        apply_pema,
        "adapter",
        "offsite tuning: adapter trained on the owner's final-layer states; `slimtune pema build-memory|train|generate`",
    ),
}


def make_config(name: str, **kwargs) -> MethodConfig:
    """``make_config("lora", r=8)`` -> a validated method config."""
    if name not in METHODS:
        raise UserError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name].config_cls(**kwargs)


def apply(model: nn.Module, cfg: MethodConfig) -> Adapted:
    """Prepare ``model`` for training with the method ``cfg`` names. The only place a method touches the model."""
    return METHODS[cfg.name].apply(model, cfg)


__all__ = ["METHODS", "Adapted", "MethodConfig", "MethodSpec", "TrainerHooks", "apply", "make_config"]
