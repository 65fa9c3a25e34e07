"""Fewer activations kept for backward, exactly: the SiLU-gated MLP and the RMSNorms of every decoder layer.

**The gated MLP**, ``down(silu(gate(x)) * up(x))``. Autograd as HF's modules run it keeps, per layer: ``gate(x)``
(for SiLU's backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), and the product (for ``down``'s weight
gradient, or a LoRA ``A``'s). At the intermediate width (2.7× the hidden size in SmolLM2, 5.4× in Qwen2.5-0.5B)
these four make most of a step's activations: 56% of full fine-tuning's on SmolLM2-135M (720 of 1,280 MiB at
4 × 256, measured with saved-tensor hooks). Here ``gate(x)`` and ``up(x)`` are kept and everything else is
recomputed in backward, element-wise (SiLU and the product: no matmul is repeated). Where ``down`` is a plain
``nn.Linear`` (full fine-tuning, or a frozen layer) it runs inside the same function, so the product is not kept
for its weight gradient either: two tensors instead of four. Where ``down`` is anything else (a LoRA layer, a
4-bit layer) it runs as itself on the product, which it may keep: three instead of four. The arithmetic is
PyTorch's own ops in autograd's order (``silu_backward`` included), so gradients equal the unfused ones bit for
bit. Applied to every decoder MLP that is exactly this form (its class forward, checked numerically on the first
one); a method that replaced the forward, as SAT does, keeps its own.

**The RMSNorms** (HF's Python ones: ``x * rsqrt(mean(x²) + eps) * weight``, computed in fp32) keep their input,
the reciprocal root and, where the weight trains, the normalised input; in a bf16 model the input is kept as its
fp32 copy. Each runs under non-reentrant activation checkpointing, which keeps only the input as it came and
reruns the same ops in backward (a few element-wise passes over ``[tokens, hidden]``): the same gradients, bit for
bit. Where no gradient is taken, both compute as HF's modules do.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _SiLUMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _gate_up_grads(ctx, grad, gate, up, F.silu(gate))


def _gate_up_grads(ctx, grad_product, gate, up, silu):
    d_gate = d_up = None
    if ctx.needs_input_grad[1]:
        d_up = grad_product * silu
    if ctx.needs_input_grad[0]:
        d_gate = torch.ops.aten.silu_backward(grad_product * up, gate)
    return d_gate, d_up


class _SiLUMulLinear(torch.autograd.Function):
    """linear(silu(gate) * up, weight, bias), keeping gate, up (and the weight) only: the product is recomputed
    for the weight gradient."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        flat = grad.reshape(-1, grad.shape[-1])
        d_weight = d_bias = None
        if ctx.needs_input_grad[2]:
            product = (silu * up).reshape(-1, up.shape[-1])
            d_weight = product.t().mm(flat).t()  # (as linear's backward forms it: the same sums)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            d_bias = flat.sum(0)
        grad_product = grad.matmul(weight) if any(ctx.needs_input_grad[:2]) else None
        d_gate, d_up = (
            (None, None) if grad_product is None else _gate_up_grads(ctx, grad_product, gate, up, silu)
        )
        return d_gate, d_up, d_weight, d_bias


def _plain_linear(layer: nn.Module) -> bool:
    # DeepSpeed ZeRO-3 gathers a partitioned weight only inside the layer's own forward
    return type(layer) is nn.Linear and not hasattr(layer.weight, "ds_id")


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(F.silu(gate) * up)
    down = self.down_proj
    if (
        _plain_linear(down)
        and not torch.is_autocast_enabled(x.device.type)
        and gate.dtype == down.weight.dtype
    ):
        return _SiLUMulLinear.apply(gate, up, down.weight, down.bias)
    return down(_SiLUMul.apply(gate, up))


def _untouched(module: nn.Module) -> bool:
    """Its class's own forward runs (no method replaced it or hooks in before it)."""
    return "forward" not in vars(module) and not module._forward_pre_hooks


def _is_silu_gated(mlp: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    parts = all(isinstance(getattr(mlp, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
    return parts and isinstance(getattr(mlp, "act_fn", None), SiLUActivation | nn.SiLU) and _untouched(mlp)


def _computes_the_same(mlp: nn.Module) -> bool:
    """The MLP's own forward is down(silu(gate(x)) * up(x)) (checked on two random tokens, without gradients)."""
    from torch._subclasses.fake_tensor import is_fake

    floats = [p for p in mlp.parameters() if p.is_floating_point()]
    width = getattr(mlp.gate_proj, "in_features", None)
    if not floats or width is None:
        return False
    p = floats[0]
    if p.is_meta or is_fake(p):
        return True  # (the planner's fake model: the same class is checked on real weights)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    training = mlp.training
    mlp.eval()  # (a LoRA dropout would draw differently each call)
    try:
        with torch.no_grad():
            own = type(mlp).forward(mlp, x)
            ours = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    finally:
        mlp.train(training)
    return torch.equal(own, ours)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every SiLU-gated decoder MLP of ``model`` the two-tensor backward; returns how many got it."""
    from slimtune.modules.arch import layer_mlps

    mlps = [m for m in layer_mlps(model) if _is_silu_gated(m)]
    checked: dict[type, bool] = {}
    n = 0
    for mlp in mlps:
        if type(mlp) not in checked:
            checked[type(mlp)] = _computes_the_same(mlp)
        if checked[type(mlp)]:
            mlp.forward = types.MethodType(_forward, mlp)
            n += 1
    return n


def _checkpointed_norm(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return checkpoint(
        type(self).forward,
        self,
        hidden_states,
        *args,
        use_reentrant=False,
        preserve_rng_state=False,
        **kwargs,
    )


def _is_rms_norm(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and not hasattr(module.weight, "ds_id")  # (ZeRO-3 gathers it only inside the module's own call)
        and _untouched(module)
    )


def checkpoint_norms(model: nn.Module) -> int:
    """Run every RMSNorm inside the decoder layers under activation checkpointing; returns how many."""
    from slimtune.modules.arch import decoder_layers

    try:
        layers = decoder_layers(model)
    except ValueError:
        return 0
    n = 0
    for layer in layers:
        for module in layer.modules():
            if _is_rms_norm(module):
                module.forward = types.MethodType(_checkpointed_norm, module)
                n += 1
    return n


def keep_fewer_activations(model: nn.Module) -> int:
    """Both of the above on ``model``; returns how many modules changed."""
    return fuse_gated_mlps(model) + checkpoint_norms(model)
