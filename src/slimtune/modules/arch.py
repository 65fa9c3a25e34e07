"""What slimtune knows of decoder architectures: module names and the shapes of the sub-layers methods rewrite.

One place for it, so methods that slice, extend or wrap a model's sub-layers agree on what a Llama-style MLP or
attention module is.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-family decoder layer (attention, then the gated MLP)."""

GATED_MLP_PARTS = (
    ("gate_proj", "up_proj", "down_proj", "act_fn"),
    ("gate_up_proj", "down_proj", "activation_fn"),
)
ATTENTION_PARTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
ATTENTION_COMMON = ("o_proj", "head_dim", "num_key_value_groups")


def is_gated_mlp(module: nn.Module) -> bool:
    """A gated MLP, down(act(gate(x)) * up(x)), with separate projections (Llama) or a fused gate_up_proj
    holding gate then up (Phi-3)."""
    return any(all(hasattr(module, a) for a in parts) for parts in GATED_MLP_PARTS)


def is_attention(module: nn.Module) -> bool:
    """A Llama-style attention with q/k/v projections, separate or fused as [q; k; v] rows (Phi-3's qkv_proj),
    grouped-query allowed."""
    return all(hasattr(module, a) for a in ATTENTION_COMMON) and any(
        all(hasattr(module, a) for a in parts) for parts in ATTENTION_PARTS
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks in its base
    model (``model.layers`` for Llama-like families, ``gpt_neox.layers``, ``transformer.h`` ...)."""
    base = getattr(model, "base_model", model)
    n = getattr(model.config, "num_hidden_layers", None)
    for _, m in base.named_children():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    for _, m in model.named_modules():  # wrapped (a peft model): the first such list at any depth
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")


def layer_mlps(model: nn.Module) -> list[nn.Module]:
    """The feed-forward block of every decoder layer (its ``mlp`` child: gated or not, fused or not), in
    order; empty when the layers have no ``mlp``."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return []
    return [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), nn.Module)]


def logit_postprocessing(config) -> tuple[float, float | None]:
    """(multiplier, soft-cap) a family applies to ``lm_head(h)``: Granite divides by ``logits_scaling``,
    Cohere multiplies by ``logit_scale``, Gemma 2/3 soft-cap with ``final_logit_softcapping``."""
    mult = 1.0
    if getattr(config, "logits_scaling", None):
        mult /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        mult *= float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return mult, (float(cap) if cap else None)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``model`` would produce from its final (normed) hidden state ``hidden``."""
    logits = model.get_output_embeddings()(hidden)
    mult, cap = logit_postprocessing(model.config)
    if mult != 1.0:
        logits = logits * mult
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def head_mismatch(model: nn.Module) -> str | None:
    """None if :func:`head_logits` reproduces ``model``'s logits from its final hidden state (checked on a few
    tokens), else what differs. Methods that read the final hidden state and apply the frozen head themselves
    (QST, PEMA) refuse a model this fails on instead of training against the wrong logits."""
    from torch._subclasses.fake_tensor import is_fake

    head = model.get_output_embeddings().weight
    if is_fake(head):
        return None  # shapes only (`slimtune plan`): a numeric check has nothing to compare
    device, vocab = head.device, head.shape[0]
    ids = torch.arange(3, 11, device=device)[None] % vocab
    out = model(input_ids=ids, output_hidden_states=True)
    mine = head_logits(model, out.hidden_states[-1])
    err = float((mine.float() - out.logits.float()).abs().max())
    scale = float(out.logits.float().abs().max()) + 1e-6
    return None if err <= 1e-3 * scale else f"max |difference| {err:.3g} of {scale:.3g}"


FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm a causal LM applies to its last decoder layer's output before the LM head."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"{type(model).__name__}: no final norm ({', '.join(FINAL_NORM_NAMES)}) in its base model"
    )


def cache_keyword(fn) -> str:
    """The name a forward takes its KV cache by: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
