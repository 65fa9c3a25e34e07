"""FLOP shares of a Llama-family model and the speed limit they put on SAT (docs/methods/sat.md).

Per-token forward multiply-accumulates: MLP 3·d·f, q+o 2·d·(H·hd), k+v 2·d·(H_kv·hd), attention scores and
values 2·L·(H·hd) (counted without causal halving), LM head d·V; every GEMM's backward is twice its forward in
full-parameter training, so the shares hold for a whole step. Omitting a fraction ρ_m of MLP channels and ρ_h of
query heads removes ρ_m·MLP + ρ_h·(q+o + scores); the Amdahl limit is 1 / (1 - removed share). k/v projections
are saved only when a whole KV group is omitted and are not counted; the optimizer step is not counted either.
"""

from __future__ import annotations

import math


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
