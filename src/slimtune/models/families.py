"""Tiny random models of the decoder families slimtune supports, built from the real ``transformers`` config
classes (no download), keeping what makes each family different: GQA ratio, tied or untied head, biases, fused
projections, norm offsets, soft-capping, sliding windows, multipliers.

Used by the tests, the capability probe (``scripts/capabilities.py``) and ``slimtune list --matrix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class Family:
    """A family's ``model_type`` and what its tiny model sets beyond :data:`COMMON`."""

    model_type: str
    what: str
    """What sets it apart (shown in the capability matrix)."""
    settings: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama 2/3, SmolLM2: GQA, tied head (as SmolLM2)", {"tie_word_embeddings": True}),
        Family(
            "mistral",
            "Mistral: GQA 4:1, sliding window, untied head",
            {"num_key_value_heads": 1, "sliding_window": 8, "tie_word_embeddings": False},
        ),
        Family("qwen2", "Qwen 2/2.5: q/k/v biases, tied head", {"tie_word_embeddings": True}),
        Family("qwen3", "Qwen 3: per-head q/k RMSNorm, explicit head_dim", {"head_dim": 16}),
        Family(
            "gemma2",
            "Gemma 2: (1+w) norms, attention and logit soft-capping, sliding window, scaled embeddings, GeGLU",
            {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True},
        ),
        Family(
            "gemma3_text",
            "Gemma 3: as Gemma 2 plus q/k norms, local/global rotary, sliding-window layer pattern",
            {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True},
        ),
        Family(
            "phi3",
            "Phi-3/4: fused qkv_proj and gate_up_proj, untied head",
            {"tie_word_embeddings": False},
        ),
        Family("olmo2", "OLMo 2: q/k RMSNorm over all heads, post-norms", {"tie_word_embeddings": False}),
        Family(
            "granite",
            "Granite: embedding, residual, attention and logit multipliers",
            {
                "embedding_multiplier": 4.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.125,
                "logits_scaling": 2.0,
                "tie_word_embeddings": True,
            },
        ),
        Family(
            "gpt_neox",
            "GPT-NeoX / Pythia: non-gated GELU MLP, fused query_key_value, LayerNorm, partial rotary",
            {"num_key_value_heads": None, "rotary_pct": 0.5, "tie_word_embeddings": False},
        ),
    )
}


def family_config(model_type: str, **overrides):
    """The real ``transformers`` config of a tiny ``model_type`` model."""
    from transformers import AutoConfig

    fam = FAMILIES.get(model_type, Family(model_type, ""))
    kwargs = {**COMMON, **fam.settings, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A seeded random causal LM of ``model_type`` (hidden 64, 2 layers, vocab 256), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = family_config(model_type, **overrides)
    config._attn_implementation = "eager" if model_type.startswith("gemma") else "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
