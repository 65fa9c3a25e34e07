"""Sliced sub-layers: the MLP and attention of a Llama-family decoder layer computed with the kept neurons only.

MLP (SwiGLU), kept channels K ⊂ {0..f-1}:

    y = W_down[:, K] (silu(W_gate[K] x) * (W_up[K] x))           three GEMMs of width |K| instead of f

Attention, kept query heads H_K (grouped-query attention: KV group of head h is h // G): q/o use the kept heads'
rows/columns; k/v are computed for the KV groups that still have a kept head and expanded to one K/V per kept
query head, then the model's own attention function runs with group size 1.

Omitting a neuron removes exactly its term, so the output equals the dense output with that neuron's activation
zeroed, and autograd's backward of the row/column gather (an index-add into zeros) gives omitted rows exactly zero
gradient. Parameters keep their full shapes; nothing is rescaled. Works for plain ``nn.Linear`` and for peft LoRA
layers (the LoRA factors are sliced with their base: ``B[K]`` for output rows, ``A[:, K]`` for input columns).

Which neurons are kept: importance per micro-batch (padding-aware, fp32), then the choice of the kept set.

Notation: X [n, d] the sub-layer's input on the batch's non-padding tokens, c_i = ||X[:, i]||_2; g_j, u_j rows of
gate/up, v_j column of down; for query head h, Q_h its rows of q_proj, O_h its columns of o_proj, K_g/V_g the rows
of its KV group. LoRA layers are scored by their frozen base weights.

| metric    | MLP channel j                    | query head h                                      |
|-----------|----------------------------------|---------------------------------------------------|
| uniform   | 1                                | 1                                                 |
| magnitude | ||[g_j; u_j; v_j]||_2            | ||[Q_h; K_g; V_g; O_h^T]||_F                      |
| wanda     | Σ_i (|g_ji| + |u_ji|) c_i        | Σ_{rows r of Q_h, K_g, V_g} Σ_i |W_ri| c_i        |
| maxip     | Σ_t |<x_t, g_j>|                 | Σ_t ||Q_h x_t||_2                                 |
| activation| Σ_t |silu(<x_t,g_j>) <x_t,u_j>|  | Σ_t ||head output_t||_2 (before o_proj)           |

``activation`` is the spec's oracle: it needs the dense gate/up pre-activations (computed without grad, then
reused for the kept channels, so the MLP forward costs 2 + (1-ρ) GEMM widths instead of 3(1-ρ)) and a dense
no-grad attention pass for heads. On SmolLM2 it is the only metric that keeps the sparse model usable (see
docs/methods/sat.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Part:
    """Output rows [offset, offset + size) of a fused projection, used wherever a linear is (Phi-3's
    ``gate_up_proj`` holds gate then up; its ``qkv_proj`` holds q, k, then v)."""

    layer: nn.Module
    offset: int
    size: int


def _unfused(layer, rows: torch.Tensor | None) -> tuple[nn.Module, torch.Tensor | None]:
    """(the real layer, ``rows`` shifted into it) for a :class:`Part`; unchanged for a plain layer."""
    if not isinstance(layer, Part):
        return layer, rows
    if rows is None:
        rows = torch.arange(layer.size, device=_lora_parts(layer.layer)[0].weight.device)
    return layer.layer, rows + layer.offset


def mlp_parts(mlp: nn.Module):
    """(gate, up, down, activation) of a gated MLP, separate (Llama) or fused (Phi-3's gate_up_proj)."""
    if hasattr(mlp, "gate_proj"):
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
    f = _lora_parts(mlp.down_proj)[0].weight.shape[1]
    return Part(mlp.gate_up_proj, 0, f), Part(mlp.gate_up_proj, f, f), mlp.down_proj, mlp.activation_fn


def attn_parts(attn: nn.Module):
    """(q, k, v, o) of an attention module, separate or fused (Phi-3's qkv_proj)."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    q = _lora_parts(attn.o_proj)[0].weight.shape[1]
    kv = (_lora_parts(attn.qkv_proj)[0].weight.shape[0] - q) // 2
    fused = attn.qkv_proj
    return Part(fused, 0, q), Part(fused, q, kv), Part(fused, q + kv, kv), attn.o_proj


def _lora_parts(layer: nn.Module):
    """(base linear, [(A, B, scale, dropout)]) for a peft LoRA layer, or (layer, []) for a plain linear."""
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer, []
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return base, []
    parts = []
    for name in layer.active_adapters:
        if name in layer.lora_A:
            parts.append(
                (
                    layer.lora_A[name].weight,
                    layer.lora_B[name].weight,
                    layer.scaling[name],
                    layer.lora_dropout[name],
                )
            )
    return base, parts


def sliced_linear(
    x: torch.Tensor, layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """``layer(x)`` restricted to output ``rows`` and input ``cols`` (``x`` already has only ``cols`` features)."""
    layer, rows = _unfused(layer, rows)
    base, loras = _lora_parts(layer)
    w, b = base.weight, base.bias
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    y = F.linear(x, w, b)
    for a_w, b_w, scale, dropout in loras:
        if cols is not None:
            a_w = a_w.index_select(1, cols)
        if rows is not None:
            b_w = b_w.index_select(0, rows)
        y = y + F.linear(F.linear(dropout(x), a_w), b_w) * scale
    return y


def base_weight(layer) -> torch.Tensor:
    if isinstance(layer, Part):
        return _lora_parts(layer.layer)[0].weight.narrow(0, layer.offset, layer.size)
    return _lora_parts(layer)[0].weight


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a [heads * head_dim, ...] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


class _KnownRows(torch.autograd.Function):
    """y = x W[rows]ᵀ (+ b[rows]) whose value is already known (from the no-grad dense pass that scored the
    neurons): forward returns it, backward is the linear's: dx = dy W[rows], dW[rows] = dyᵀ x, db[rows] = Σ dy."""

    @staticmethod
    def forward(ctx, known, x, weight, bias, rows):
        ctx.save_for_backward(x, weight, rows)
        ctx.has_bias = bias is not None
        return known

    @staticmethod
    def backward(ctx, dy):
        x, weight, rows = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            dx = dy @ weight.index_select(0, rows)
        flat_dy, flat_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            dw = torch.zeros_like(weight).index_add_(0, rows, (flat_dy.t() @ flat_x).to(weight.dtype))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = torch.zeros(weight.shape[0], dtype=dy.dtype, device=dy.device).index_add_(
                0, rows, flat_dy.sum(0)
            )
        return None, dx, dw, db, None


def _rows_of(x, layer, rows, known, reuse):
    real, real_rows = _unfused(layer, rows)
    if reuse and getattr(real, "base_layer", None) is None:  # a plain linear: reuse known values
        with torch.no_grad():  # (a checkpointed recomputation has no dense pass; its values are recomputed)
            values = known.index_select(-1, rows) if known is not None else sliced_linear(x, layer, rows=rows)
        return _KnownRows.apply(values, x, real.weight, real.bias, real_rows)
    return sliced_linear(x, layer, rows=rows)


def mlp_forward(
    mlp: nn.Module,
    x: torch.Tensor,
    kept: torch.Tensor,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    reuse: bool = False,
) -> torch.Tensor:
    """The MLP on the kept channels. ``known``: the dense gate and up outputs already computed without grad;
    ``reuse``: take gate/up values from ``known`` (the same autograd path either way, so a checkpointed
    recomputation saves the same tensors as the first forward)."""
    gate_p, up_p, down_p, act = mlp_parts(mlp)
    gate = _rows_of(x, gate_p, kept, known[0] if known else None, reuse)
    up = _rows_of(x, up_p, kept, known[1] if known else None, reuse)
    return sliced_linear(act(gate) * up, down_p, cols=kept)


class _OneGroupView:
    """The attention module as seen by its attention function after K/V were expanded per kept query head."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _model_namespace(module: nn.Module):
    return sys.modules[type(module).__module__]


def _heads_of(attn: nn.Module, which: str, x: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """Query or key heads ``rows`` as [batch, heads, tokens, head_dim], with the family's q/k norm: per head
    (Qwen 3, Gemma 3: on the sliced heads) or over the whole projection (OLMo 2: the dense projection is
    normalized first, then sliced, so the kept heads see the same normalization as in the dense model)."""
    proj, norm = attn_parts(attn)["qk".index(which)], getattr(attn, f"{which}_norm", None)
    if norm is None:
        return sliced_linear(x, proj, rows=rows).view(shape).transpose(1, 2)
    if norm.weight.numel() == attn.head_dim:
        return norm(sliced_linear(x, proj, rows=rows).view(shape)).transpose(1, 2)
    return norm(proj(x)).index_select(-1, rows).view(shape).transpose(1, 2)


def attend(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    kept: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The kept query heads' attention outputs before ``o_proj``: [batch, tokens, len(kept) * head_dim]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ns = _model_namespace(attn)
    hd, groups = attn.head_dim, attn.num_key_value_groups
    shape = (*hidden_states.shape[:-1], -1, hd)
    kv_used = torch.unique(kept // groups)  # sorted
    q_rows, kv_rows = head_rows(kept, hd), head_rows(kv_used, hd)
    q = _heads_of(attn, "q", hidden_states, q_rows, shape)
    k = _heads_of(attn, "k", hidden_states, kv_rows, shape)
    v = sliced_linear(hidden_states, attn_parts(attn)[2], rows=kv_rows).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = ns.apply_rotary_pos_emb(q, k, cos, sin)
    if groups > 1:  # one K/V per kept query head (what repeat_kv does for all heads in the dense path)
        pos = torch.searchsorted(kv_used, kept // groups)
        k, v = k.index_select(1, pos), v.index_select(1, pos)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, ns.eager_attention_forward)
    kwargs.pop("past_key_values", None)  # the KV cache (named `cache` from transformers 5.24): not used here
    kwargs.pop("cache", None)
    for name in ("sliding_window", "softcap"):  # what the family's own forward passes (Mistral, Qwen, Gemma)
        value = getattr(attn, "attn_logit_softcapping" if name == "softcap" else name, None)
        if value is not None:
            kwargs.setdefault(name, value)
    out, _ = fn(
        _OneGroupView(attn),
        q,
        k,
        v,
        attention_mask,
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
        **kwargs,
    )
    return out.reshape(*hidden_states.shape[:-1], -1).contiguous()


def attention_forward(attn: nn.Module, hidden_states, position_embeddings, attention_mask, kept, **kwargs):
    """Llama-family attention over the kept query heads ``kept`` (sorted); returns (output, None)."""
    out = attend(attn, hidden_states, position_embeddings, attention_mask, kept, **kwargs)
    return sliced_linear(out, attn_parts(attn)[3], cols=head_rows(kept, attn.head_dim)), None


def omitted_slices(
    module: nn.Module, kind: str, omitted: torch.Tensor, kv_omitted: torch.Tensor | None = None
):
    """[(param, dim, index)] of the trainable tensors that omitting ``omitted`` neurons leaves without gradient."""
    out = []

    def add(layer, rows=None, cols=None):
        if isinstance(layer, Part):
            layer, rows = _unfused(layer, rows)
        base, loras = _lora_parts(layer)
        if not loras:
            if rows is not None:
                out.append((base.weight, 0, rows))
                if base.bias is not None:
                    out.append((base.bias, 0, rows))
            if cols is not None:
                out.append((base.weight, 1, cols))
            return
        for a_w, b_w, _, _ in loras:
            if rows is not None:
                out.append((b_w, 0, rows))
            if cols is not None:
                out.append((a_w, 1, cols))

    if kind == "mlp":
        gate, up, down, _ = mlp_parts(module)
        add(gate, rows=omitted)
        add(up, rows=omitted)
        add(down, cols=omitted)
    else:
        hd = module.head_dim
        q, k, v, o = attn_parts(module)
        add(q, rows=head_rows(omitted, hd))
        add(o, cols=head_rows(omitted, hd))
        if kv_omitted is not None and len(kv_omitted):
            add(k, rows=head_rows(kv_omitted, hd))
            add(v, rows=head_rows(kv_omitted, hd))
    return [(p, d, i) for p, d, i in out if p.requires_grad]


def complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices in range(n) that are not in ``kept``."""
    keep = torch.zeros(n, dtype=torch.bool, device=kept.device)
    keep[kept] = True
    return (~keep).nonzero().squeeze(1)


def _input_cols_no_bias(x: torch.Tensor, layer: nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """What input columns ``cols`` (``x`` holds only those features) add to ``layer``'s output, bias excluded."""
    base, loras = _lora_parts(layer)
    y = F.linear(x, base.weight.index_select(1, cols))
    for a_w, b_w, scale, _ in loras:
        y = y + F.linear(F.linear(x, a_w.index_select(1, cols)), b_w) * scale
    return y


@torch.no_grad()
def omitted_mlp_output(
    mlp: nn.Module, x: torch.Tensor, kept: torch.Tensor, known: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """The omitted channels' share of the MLP output, without grad (omit=backward: dense forward value,
    gradient only through the kept channels). Reuses the dense gate/up values when the scorer computed them."""
    gate_p, up_p, down_p, act = mlp_parts(mlp)
    omitted = complement(kept, base_weight(gate_p).shape[0])
    if known is not None:
        gate, up = known[0].index_select(-1, omitted), known[1].index_select(-1, omitted)
    else:
        gate, up = sliced_linear(x, gate_p, rows=omitted), sliced_linear(x, up_p, rows=omitted)
    return _input_cols_no_bias(act(gate) * up, down_p, omitted)


@torch.no_grad()
def omitted_heads_output(
    attn: nn.Module,
    hidden_states,
    position_embeddings,
    attention_mask,
    kept: torch.Tensor,
    every_out: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The omitted query heads' share of the attention output (after ``o_proj``), without grad.
    ``every_out``: every head's output before ``o_proj`` when the scorer already computed it."""
    hd = attn.head_dim
    omitted = complement(kept, base_weight(attn_parts(attn)[0]).shape[0] // hd)
    cols = head_rows(omitted, hd)
    if every_out is not None:
        out = every_out.index_select(-1, cols)
    else:
        out = attend(attn, hidden_states, position_embeddings, attention_mask, omitted, **kwargs)
    return _input_cols_no_bias(out, attn_parts(attn)[3], cols)


# ---------------------------------------------------------------- importance and the kept set
