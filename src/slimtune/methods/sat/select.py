"""Neuron importance (per micro-batch, padding-aware, fp32) and the choice of the kept set.

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

import math

import torch

from slimtune.methods.sat.ops import base_weight


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.detach()
    if mask is not None and mask.shape == x.shape[:-1]:
        return x[mask.bool()].float()
    return x.reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def mlp_scores(mlp, x: torch.Tensor, mask: torch.Tensor | None, metric: str) -> torch.Tensor:
    wg, wu = base_weight(mlp.gate_proj).float(), base_weight(mlp.up_proj).float()
    if metric == "uniform":
        return torch.ones(wg.shape[0], device=wg.device)
    if metric == "magnitude":
        wd = base_weight(mlp.down_proj).float()
        return (wg.square().sum(1) + wu.square().sum(1) + wd.square().sum(0)).sqrt()
    xs = _tokens(x, mask)
    if metric == "wanda":
        c = xs.norm(dim=0)
        return wg.abs() @ c + wu.abs() @ c
    if metric == "maxip":
        return (xs @ wg.t()).abs().sum(0)
    raise ValueError(metric)


@torch.no_grad()
def head_scores(attn, x: torch.Tensor, mask: torch.Tensor | None, metric: str) -> torch.Tensor:
    hd, groups = attn.head_dim, attn.num_key_value_groups
    wq = base_weight(attn.q_proj).float()
    n_heads = wq.shape[0] // hd
    if metric == "uniform":
        return torch.ones(n_heads, device=wq.device)
    wk, wv = base_weight(attn.k_proj).float(), base_weight(attn.v_proj).float()
    group_of = torch.arange(n_heads, device=wq.device) // groups
    if metric == "magnitude":
        wo = base_weight(attn.o_proj).float()
        per_q = wq.square().sum(1).view(n_heads, hd).sum(1) + wo.square().sum(0).view(n_heads, hd).sum(1)
        per_kv = (wk.square().sum(1) + wv.square().sum(1)).view(-1, hd).sum(1)
        return (per_q + per_kv[group_of]).sqrt()
    xs = _tokens(x, mask)
    if metric == "wanda":
        c = xs.norm(dim=0)
        per_q = (wq.abs() @ c).view(n_heads, hd).sum(1)
        per_kv = (wk.abs() @ c + wv.abs() @ c).view(-1, hd).sum(1)
        return per_q + per_kv[group_of]
    if metric == "maxip":
        return (xs @ wq.t()).view(xs.shape[0], n_heads, hd).norm(dim=-1).sum(0)
    raise ValueError(metric)


@torch.no_grad()
def activation_scores(act: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over non-padding tokens of |activation| per neuron: ``act`` is [batch, tokens, neurons]."""
    return _tokens(act, mask).abs().sum(0)


def n_kept(n: int, rate: float, min_keep: int) -> int:
    """|K| = n - floor(rate * n), at least ``min_keep`` (and at most n)."""
    return min(n, max(min_keep, n - math.floor(rate * n)))


def choose(
    scores: torch.Tensor, k: int, selection: str, generator: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
    """Sorted indices of the k kept neurons (on the scores' device)."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if selection == "topk":
        # stable order for ties: the lower index wins
        order = torch.sort(scores.detach().cpu().double(), descending=True, stable=True).indices
        idx = order[:k]
    else:
        s = scores.detach().cpu().double().clamp(min=0)
        p = (s + 1e-6 * s.mean()).pow(1.0 / temperature)
        if not torch.isfinite(p).all() or p.sum() <= 0:
            p = torch.ones_like(p)
        idx = torch.multinomial(p, k, replacement=False, generator=generator)
    return idx.sort().values.to(scores.device)
