"""peft LoRA layers with the update folded into one matmul: ``addmm(base(x), A(x), Bᵀ, alpha=scaling)``.

peft computes ``base(x) + B(A(x)) * scaling`` (the 4-bit layer clones ``base(x)`` first): two or three element-wise
passes over a ``[tokens, out_features]`` tensor per adapted layer forward, one more in backward (the scaling of
the incoming gradient). BLAS takes ``scaling`` and the addition in the product itself (``alpha``, ``beta = 1``), and
autograd's ``addmm`` backward scales only the ``[tokens, r]`` side. Measured on a LoRA step of SmolLM2-135M
(4 × 256, 2 threads, one process alternating both): 2.81 s against peft's 2.89 s; QLoRA within noise. (Most of a
step's element-wise time is the model's own: RMSNorm, rotary embedding, the SiLU gate.)

Only the plain case is fused; everything else runs peft's own forward unchanged: several or mixed adapters,
merged or disabled adapters, DoRA and other variants, dropout, a bias on B, autocast, A and B in different dtypes,
extra arguments, and DeepSpeed ZeRO-3 (B's weight is gathered only inside B's own forward there). fp32 adapters on
a bf16 model are fused as peft computes them: the sum in the adapter's dtype, the output in the base layer's.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _plain_adapter(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one adapter to fuse, or None where peft's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    a, b = layer.lora_A[name], layer.lora_B[name]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    if b.bias is not None or hasattr(b.weight, "ds_id") or torch.is_autocast_enabled(x.device.type):
        return None
    return name if a.weight.dtype == b.weight.dtype else None


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    h = self.lora_A[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype))
    b = self.lora_B[name].weight
    flat = result.reshape(-1, result.shape[-1])
    out = torch.addmm(flat.to(b.dtype), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def fuse_lora_forwards(model: nn.Module) -> int:
    """Give every peft LoRA linear layer of ``model`` the fused forward (per instance: a deep copy keeps it, and a
    layer that is not plain at call time runs peft's own); returns how many layers got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) or (
            type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("peft.")
        ):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
