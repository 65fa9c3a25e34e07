"""Which MLP channels and heads a SAT step keeps, and what omitting the others can pay.

Importance scores (activation magnitudes over a step's tokens, per MLP channel and per query head), the kept
count for an omission rate and the choice of kept sets; then the FLOP shares of a Llama-family model and the
speed limit they put on SAT (docs/methods/sat.md).

Per-token forward multiply-accumulates: MLP 3·d·f, q+o 2·d·(H·hd), k+v 2·d·(H_kv·hd), attention scores and
values 2·L·(H·hd) (counted without causal halving), LM head d·V; every GEMM's backward is twice its forward in
full-parameter training, so the shares hold for a whole step. Omitting a fraction ρ_m of MLP channels and ρ_h of
query heads removes ρ_m·MLP + ρ_h·(q+o + scores); the Amdahl limit is 1 / (1 - removed share). k/v projections
are saved only when a whole KV group is omitted and are not counted; the optimizer step is not counted either.
"""

from __future__ import annotations

import math

import torch

from slimtune.methods.sat.layer import attn_parts, base_weight, mlp_parts


def flop_shares(config, seq_len: int) -> dict[str, float]:
    d, f = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    layers = config.num_hidden_layers
    macs = {
        "mlp": layers * 3 * d * f,
        "q_o": layers * 2 * d * heads * hd,
        "k_v": layers * 2 * d * kv * hd,
        "attn_scores": layers * 2 * seq_len * heads * hd,
        "lm_head": d * config.vocab_size,
    }
    total = sum(macs.values())
    return {k: v / total for k, v in macs.items()}


def omitted_fractions(config, rate: float, targets) -> dict[str, float]:
    """The fractions of MLP channels and query heads a layer really omits (integer rounding included)."""
    f, heads = config.intermediate_size, config.num_attention_heads
    return {
        "mlp": math.floor(rate * f) / f if "mlp" in targets else 0.0,
        "attn": math.floor(rate * heads) / heads if "attn" in targets else 0.0,
    }


def selector_share(shares: dict[str, float], metric: str, targets) -> float:
    """Step-FLOP share the importance metric adds (a no-grad forward costs 1/3 of a part's step share).
    activation: dense gate+up (2/3 of the MLP forward; reused for the kept channels, see ``mlp_credit``) and a
    dense q/k/v + attention pass for heads; maxip: the gate projection / the q projection; others: ~0."""
    extra = 0.0
    if "mlp" in targets:
        extra += {"activation": 2 / 9, "maxip": 1 / 9}.get(metric, 0.0) * shares["mlp"]
    if "attn" in targets:
        if metric == "activation":
            extra += (shares["q_o"] / 2 + shares["k_v"] + shares["attn_scores"]) / 3
        elif metric == "maxip":
            extra += shares["q_o"] / 2 / 3
    return extra


def speed_limit(
    config, seq_len: int, rate: float, targets, metric: str = "wanda", omit: str = "forward"
) -> dict[str, float]:
    """FLOP-share limit of SAT's speed-up over dense training at ``rate``, selector cost included.
    omit=backward: the forward stays dense, so only the backward's 2/3 of each omitted GEMM is saved (minus,
    for heads scored by ``activation``, the kept heads' forward that runs again with grad)."""
    shares = flop_shares(config, seq_len)
    omit_frac = omitted_fractions(config, rate, targets)
    attn_share = shares["q_o"] + shares["attn_scores"]
    if omit == "backward":
        removed = omit_frac["mlp"] * 2 / 3 * shares["mlp"]
        kept_heads = 1 - omit_frac["attn"]
        extra = 0.0
        if metric == "activation" and omit_frac["attn"] > 0:  # kept heads' forward again, with grad
            extra = kept_heads / 3 * attn_share + shares["k_v"] / 3
        removed += omit_frac["attn"] * 2 / 3 * attn_share - extra
    else:
        removed = omit_frac["mlp"] * shares["mlp"] + omit_frac["attn"] * attn_share
        if metric == "activation" and "mlp" in targets:
            # the reused dense gate/up values make the kept channels' gate/up forward free: credit it back
            removed += (1 - omit_frac["mlp"]) * 2 / 9 * shares["mlp"]
    selector = selector_share(shares, metric, targets)
    if omit == "backward" and metric == "activation":
        selector = 0.0  # the scoring pass is the dense forward itself (its extra work is counted above)
    return {
        "rate": rate,
        "metric": metric,
        "omit": omit,
        "omitted_mlp": omit_frac["mlp"],
        "omitted_heads": omit_frac["attn"],
        "omittable_share": shares["mlp"] * ("mlp" in targets)
        + (shares["q_o"] + shares["attn_scores"]) * ("attn" in targets),
        "selector_share": selector,
        "removed_share": removed - selector,
        "flop_speed_limit": 1 / (1 - removed + selector),
    }


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.detach()
    if mask is not None and mask.shape == x.shape[:-1]:
        return x[mask.bool()].float()
    return x.reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def mlp_scores(mlp, x: torch.Tensor, mask: torch.Tensor | None, metric: str) -> torch.Tensor:
    gate_p, up_p, down_p, _ = mlp_parts(mlp)
    wg, wu = base_weight(gate_p).float(), base_weight(up_p).float()
    if metric == "uniform":
        return torch.ones(wg.shape[0], device=wg.device)
    if metric == "magnitude":
        wd = base_weight(down_p).float()
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
    q_p, k_p, v_p, o_p = attn_parts(attn)
    wq = base_weight(q_p).float()
    n_heads = wq.shape[0] // hd
    if metric == "uniform":
        return torch.ones(n_heads, device=wq.device)
    wk, wv = base_weight(k_p).float(), base_weight(v_p).float()
    group_of = torch.arange(n_heads, device=wq.device) // groups
    if metric == "magnitude":
        wo = base_weight(o_p).float()
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
