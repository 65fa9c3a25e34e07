"""FLOP shares of a Llama-family model and the speed limit they put on SAT (specs/sat.md §6.2).

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


def speed_limit(config, seq_len: int, rate: float, targets) -> dict[str, float]:
    shares = flop_shares(config, seq_len)
    omit = omitted_fractions(config, rate, targets)
    removed = omit["mlp"] * shares["mlp"] + omit["attn"] * (shares["q_o"] + shares["attn_scores"])
    return {
        "rate": rate,
        "omitted_mlp": omit["mlp"],
        "omitted_heads": omit["attn"],
        "omittable_share": shares["mlp"] * ("mlp" in targets)
        + (shares["q_o"] + shares["attn_scores"]) * ("attn" in targets),
        "removed_share": removed,
        "flop_speed_limit": 1 / (1 - removed),
    }
