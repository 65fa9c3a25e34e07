"""What slimtune knows of decoder architectures: module names and the shapes of the sub-layers methods rewrite.

One place for it, so methods that slice, extend or wrap a model's sub-layers agree on what a Llama-style MLP or
attention module is.
"""

from __future__ import annotations

from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-family decoder layer (attention, then the gated MLP)."""

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups")


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama-style gated MLP: down(act(gate(x)) * up(x))."""
    return all(hasattr(module, a) for a in GATED_MLP_PARTS)


def is_attention(module: nn.Module) -> bool:
    """A Llama-style attention module with separate q/k/v/o projections (grouped-query allowed)."""
    return all(hasattr(module, a) for a in ATTENTION_PARTS)


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Every Llama-style gated MLP of ``model``, in model order."""
    return [m for _, m in model.named_modules() if is_gated_mlp(m)]
