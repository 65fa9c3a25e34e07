"""Applying the baselines: full fine-tuning, LoRA through peft, and QLoRA (peft LoRA on an NF4 4-bit base)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from slimtune.methods.base import Adapted
from slimtune.methods.baselines.config import FullConfig, LoraMethodConfig, QLoraMethodConfig
from slimtune.methods.baselines.fused import fuse_lora_forwards
from slimtune.modules.quant.backbone import dequantized_weight, is_4bit, quantize_decoder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- full fine-tuning


class FullAdapted(Adapted):
    def merge(self) -> nn.Module:
        return self.model


def apply_full(model: nn.Module, cfg: FullConfig) -> FullAdapted:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return FullAdapted(model, cfg)


# ---------------------------------------------------------------- LoRA


class LoraAdapted(Adapted):
    """A peft ``PeftModel``; saves in peft's own format so ``PeftModel.from_pretrained`` loads it."""

    state_file = "adapter_model.safetensors"

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"unexpected LoRA tensors: {unexpected[:3]}")

    def write_tensors(self, out: Path) -> None:
        self.model.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors

    def merge(self) -> nn.Module:
        merged = copy.deepcopy(self.model).merge_and_unload()
        return merged


def peft_lora(
    model: nn.Module, cfg: LoraMethodConfig, custom: dict | None = None, fused: bool = False
) -> nn.Module:
    """Wrap ``model`` with peft LoRA. ``custom`` maps non-``nn.Linear`` base layer types (our NF4Linear) to the
    peft LoRA layer that wraps them; 'all-linear' then means every module of those types. ``fused``: the LoRA
    and QLoRA methods' one-matmul forward (fused.py); without it, peft's own layers and nothing more."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    if custom and targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) in custom})
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
    )
    if custom:
        lcfg._register_custom_module(custom)
    peft_model = get_peft_model(model, lcfg)
    if fused:
        fuse_lora_forwards(peft_model)
    return peft_model


def apply_lora(model: nn.Module, cfg: LoraMethodConfig) -> LoraAdapted:
    return LoraAdapted(peft_lora(model, cfg, fused=True), cfg)


# ---------------------------------------------------------------- QLoRA


def apply_qlora(model: nn.Module, cfg: QLoraMethodConfig) -> QLoraAdapted:
    backend = quantize_decoder(model, cfg.backend, cfg.double_quant)
    if backend == "torch":
        from peft.tuners.lora.layer import Linear as LoraLinear

        from slimtune.modules.quant.nf4 import NF4Linear

        peft_model = peft_lora(model, cfg, custom={NF4Linear: LoraLinear}, fused=True)
    else:
        peft_model = peft_lora(model, cfg, fused=True)
    adapted = QLoraAdapted(peft_model, cfg)
    adapted.extra_state["nf4_backend"] = backend
    return adapted


class QLoraAdapted(LoraAdapted):
    def compile_refusal(self) -> str | None:
        if self.extra_state.get("nf4_backend") == "torch":
            return (
                "the pure-torch NF4 backend does not trace as one graph yet (each layer's quantization constants "
                "are Python values Dynamo guards on, one recompilation per layer); backend: bitsandbytes compiles"
            )
        return None

    def merge(self) -> nn.Module:
        """Dequantize the NF4 base and fold the LoRA update in: a plain full-precision HF model.

        Effective weights are read from the live layers first (a deep copy of a bitsandbytes layer that has
        repacked its weights for CPU inference does not compute the same thing), then set on a copy.
        """
        prefix = "base_model.model."
        weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for name, module in self.model.named_modules():
                if hasattr(module, "base_layer") and hasattr(module, "lora_A") and is_4bit(module.base_layer):
                    w = dequantized_weight(module.base_layer)
                    if "default" in module.lora_A:
                        w = w + module.get_delta_weight("default").to(w.dtype)
                    weights[name.removeprefix(prefix)] = (w, module.base_layer.bias)
                elif is_4bit(module) and not name.endswith(".base_layer"):
                    weights[name.removeprefix(prefix)] = (dequantized_weight(module), module.bias)
        base = copy.deepcopy(self.model).get_base_model()
        for name, (w, bias) in weights.items():
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                if bias is not None:
                    lin.bias.copy_(bias)
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, lin)
        return base
