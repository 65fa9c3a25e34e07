"""QST's side network and the wrapper that runs it beside a frozen backbone.

Paper: Zhang et al., "Quantized Side Tuning: Fast and Memory-Efficient Tuning of Quantized Large Language Models",
ACL 2024 (arXiv 2401.07159), building on Ladder Side-Tuning (Sung et al., NeurIPS 2022).

With backbone layer outputs h_0 (embeddings), h_1..h_N (pre-final-norm residual stream, shape [B, T, d]), all
computed under ``torch.no_grad()``:

    g   = D_0(h_0)                                   # [B, T, d_s], d_s = d / r
    for i = 1..N:  beta_i = sigmoid(gamma_i)
                   g = (1 - beta_i) * D_{max(i-1,0)}(h_i) + beta_i * g
                   g = SideLayer_i(g)                # a Llama decoder layer of width d_s, same heads
    h   = alpha * FinalNorm(h_N) + (1 - alpha) * U(RMSNorm_side(g))     # U: d_s -> d
    logits = lm_head(h)                              # frozen head

Only D, gamma, the side layers and norm, U and alpha are trained; nothing back-propagates through the backbone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from slimtune.losses import IGNORE, frozen_head_cross_entropy
from slimtune.methods.qst.config import QSTConfig


class Downsample(nn.Module):
    """d -> d_s. adapter: LN(W_B silu(W_A x)); lora: LN(W_B W_A x); linear: W x; max/avg pooling: no parameters."""

    def __init__(self, kind: str, d: int, d_s: int, rank: int, dropout: float):
        super().__init__()
        self.kind, self.r = kind, d // d_s
        if kind in ("adapter", "lora"):
            self.a = nn.Linear(d, rank, bias=False)
            self.b = nn.Linear(rank, d_s, bias=False)
            self.norm = nn.LayerNorm(d_s)
            self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        elif kind == "linear":
            self.proj = nn.Linear(d, d_s, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("adapter", "lora"):
            z = self.a(x)
            if self.kind == "adapter":
                z = F.silu(z)
            return self.norm(self.b(self.drop(z)))
        if self.kind == "linear":
            return self.proj(x)
        shape = x.shape
        flat = x.reshape(-1, 1, shape[-1])
        pooled = F.max_pool1d(flat, self.r) if self.kind == "maxpool" else F.avg_pool1d(flat, self.r)
        return pooled.reshape(*shape[:-1], shape[-1] // self.r)


def side_config(backbone_config, r: int):
    """A copy of the backbone's config at width d/r (heads unchanged, so head_dim shrinks by r)."""
    cfg = copy.deepcopy(backbone_config)
    d, heads = backbone_config.hidden_size, backbone_config.num_attention_heads
    cfg.hidden_size = d // r
    cfg.intermediate_size = backbone_config.intermediate_size // r
    cfg.head_dim = (d // r) // heads
    cfg._attn_implementation = "sdpa"
    return cfg


def check_shape(backbone_config, r: int) -> list[str]:
    d, heads, ff = (
        backbone_config.hidden_size,
        backbone_config.num_attention_heads,
        backbone_config.intermediate_size,
    )
    problems = []
    if d % r:
        problems.append(f"method.r: {r} does not divide the hidden size {d}")
    elif (d // r) % heads:
        problems.append(f"method.r: side width {d // r} is not a multiple of the {heads} attention heads")
    if ff % r:
        problems.append(f"method.r: {r} does not divide the FFN size {ff}")
    return problems


class SideNetwork(nn.Module):
    """All trainable parts of QST for a backbone with ``N`` decoder layers."""

    def __init__(self, backbone_config, cfg: QSTConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        d, n = backbone_config.hidden_size, backbone_config.num_hidden_layers
        self.config = side_config(backbone_config, cfg.r)
        d_s = self.config.hidden_size
        self.down = nn.ModuleList(Downsample(cfg.downsample, d, d_s, cfg.rank, cfg.dropout) for _ in range(n))
        gate_shape = (n, d_s) if cfg.gate_shape == "channel" else (n, 1)
        self.gamma = nn.Parameter(torch.full(gate_shape, float(cfg.gate_init)))
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.config, layer_idx=i) for i in range(n))
        self.norm = LlamaRMSNorm(d_s, eps=self.config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(config=self.config)
        self.up = nn.Linear(d_s, d)
        self.alpha = nn.Parameter(torch.full((d,), float(cfg.alpha_init)))

    def forward(
        self, states: list[torch.Tensor], h_final: torch.Tensor, attention_mask, position_ids, cache=None
    ) -> torch.Tensor:
        """``states`` = [h_0, ..., h_N] (no grad); returns the fused final hidden state h (width d)."""
        from transformers.masking_utils import create_causal_mask

        dtype = self.up.weight.dtype
        g = self.down[0](states[0].to(dtype))
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=g,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        pos = self.rotary(g, position_ids=position_ids)
        for i, layer in enumerate(self.layers, start=1):
            beta = torch.sigmoid(self.gamma[i - 1])
            g = (1 - beta) * self.down[i - 1](states[i].to(dtype)) + beta * g
            g = layer(
                g,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=pos,
            )
        side = self.up(self.norm(g))
        return self.alpha * h_final.to(dtype) + (1 - self.alpha) * side


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. The labels are shifted (not the logits), so the [B, T, V] logits are never
    copied; the last position has no target."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE)


@dataclass
class QSTCache:
    """The two KV caches QST advances during generation: the backbone's and the side network's."""

    backbone: object
    side: object

    def get_seq_length(self) -> int:
        return self.backbone.get_seq_length()


class QSTModel(nn.Module):
    """A frozen (4-bit) causal LM plus a trainable :class:`SideNetwork`; ``forward`` returns loss and logits."""

    def __init__(self, backbone: nn.Module, cfg: QSTConfig):
        super().__init__()
        self.backbone = backbone
        self.qst = SideNetwork(backbone.config, cfg)
        self.fused_loss = cfg.fused_loss
        self.config = backbone.config

    def train(self, mode: bool = True) -> QSTModel:
        """Only the side network changes mode; the frozen backbone always runs as in inference."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _decoder(self) -> nn.Module:
        return self.backbone.model

    def run_backbone(
        self, input_ids, attention_mask, position_ids, cache
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Backbone forward without autograd; returns [h_0..h_N] (pre-norm) and FinalNorm(h_N)."""
        decoder = self._decoder()
        states: list[torch.Tensor] = []
        hooks = [decoder.embed_tokens.register_forward_hook(lambda m, i, o: states.append(o))]
        hooks += [
            layer.register_forward_hook(lambda m, i, o: states.append(o[0] if isinstance(o, tuple) else o))
            for layer in decoder.layers
        ]
        try:
            with torch.no_grad():
                out = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                )
        finally:
            for h in hooks:
                h.remove()
        return states, out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: QSTCache | None = None,
        **_,
    ) -> CausalLMOutputWithPast:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + past).unsqueeze(0)
        states, h_final = self.run_backbone(
            input_ids, attention_mask, position_ids, cache.backbone if cache is not None else None
        )
        h = self.qst(states, h_final, attention_mask, position_ids, cache.side if cache is not None else None)
        head = self.backbone.get_output_embeddings()
        h = h.to(head.weight.dtype)
        if labels is not None and self.training and self.fused_loss and getattr(head, "bias", None) is None:
            # Training: the frozen head's loss gradient is formed chunk by chunk; no [B, T, V] logits exist.
            return CausalLMOutputWithPast(loss=frozen_head_cross_entropy(h, head.weight, labels), logits=None)
        logits = head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def new_cache(self) -> QSTCache:
        from transformers import DynamicCache

        return QSTCache(DynamicCache(config=self.backbone.config), DynamicCache(config=self.qst.config))
