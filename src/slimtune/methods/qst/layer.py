"""QST's side network and the wrapper that runs it beside a frozen backbone.

Paper: Zhang et al., "Quantized Side Tuning: Fast and Memory-Efficient Tuning of Quantized Large Language Models",
ACL 2024 (arXiv 2401.07159), building on Ladder Side-Tuning (Sung et al., NeurIPS 2022).

With backbone layer outputs h_0 (embeddings), h_1..h_N (pre-final-norm residual stream, shape [B, T, d]), all
computed under ``torch.no_grad()``:

    g   = D_0(h_0)                                   # [B, T, d_s], d_s = d / r
    for i = 1..N:  beta_i = sigmoid(gamma_i)
                   g = (1 - beta_i) * D_{max(i-1,0)}(h_i) + beta_i * g
                   g = SideLayer_i(g)                # the backbone's own decoder layer at width d_s
    h   = alpha * FinalNorm(h_N) + (1 - alpha) * U(SideNorm(g))          # U: d_s -> d
    logits = post(lm_head(h))                        # frozen head (+ the family's scaling / soft-capping)

The side layers, their norm and rotary embedding are the backbone family's own (built with ``AutoModel`` from
the backbone's config at width d/r, heads kept so head_dim shrinks by r): biases, q/k norms, norm offsets,
sliding windows, soft-capping and multipliers follow the backbone. h_0 is the input of the first decoder layer
(embeddings after the family's scaling).

Only D, gamma, the side layers and norm, U and alpha are trained; nothing back-propagates through the backbone.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from slimtune.methods.qst.config import QSTConfig
from slimtune.modules.arch import cache_keyword, decoder_layers, head_logits, logit_postprocessing
from slimtune.modules.losses import IGNORE, frozen_head_cross_entropy


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
    """A copy of the backbone's config at width d/r (heads unchanged, so head_dim shrinks by r), with a one-token
    vocabulary (the side network never embeds tokens)."""
    cfg = copy.deepcopy(backbone_config)
    d, heads = backbone_config.hidden_size, backbone_config.num_attention_heads
    cfg.hidden_size = d // r
    cfg.intermediate_size = backbone_config.intermediate_size // r
    cfg.head_dim = (d // r) // heads
    if getattr(cfg, "query_pre_attn_scalar", None) is not None:  # Gemma: attention scale 1/sqrt(head_dim)
        cfg.query_pre_attn_scalar = cfg.head_dim
    cfg.vocab_size = 1
    cfg.pad_token_id = None  # the real vocabulary's pad id would not fit a one-token embedding
    cfg.tie_word_embeddings = False
    cfg._attn_implementation = backbone_config._attn_implementation or "sdpa"
    return cfg


def _rotary_share(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    for key in ("partial_rotary_factor", "rotary_pct"):
        value = params.get(key) if isinstance(params, dict) else None
        value = value if value is not None else getattr(config, key, None)
        if value is not None:
            return float(value)
    return 1.0


def check_shape(backbone_config, r: int) -> list[str]:
    d, heads = backbone_config.hidden_size, backbone_config.num_attention_heads
    ff = getattr(backbone_config, "intermediate_size", None)
    problems = []
    if ff is None:
        return [f"method qst: {type(backbone_config).__name__} has no intermediate_size to shrink"]
    if d % r:
        problems.append(f"method.r: {r} does not divide the hidden size {d}")
    elif (d // r) % heads:
        problems.append(f"method.r: side width {d // r} is not a multiple of the {heads} attention heads")
    elif int((d // r) // heads * _rotary_share(backbone_config)) % 2:
        problems.append(
            f"method.r: the side head_dim {(d // r) // heads} leaves an odd number of rotary dimensions; "
            "choose a smaller r"
        )
    if ff % r:
        problems.append(f"method.r: {r} does not divide the FFN size {ff}")
    return problems


class SideNetwork(nn.Module):
    """All trainable parts of QST for a backbone with ``N`` decoder layers."""

    def __init__(self, backbone_config, cfg: QSTConfig):
        super().__init__()
        from transformers import AutoModel

        d, n = backbone_config.hidden_size, backbone_config.num_hidden_layers
        self.config = side_config(backbone_config, cfg.r)
        d_s = self.config.hidden_size
        self.down = nn.ModuleList(Downsample(cfg.downsample, d, d_s, cfg.rank, cfg.dropout) for _ in range(n))
        gate_shape = (n, d_s) if cfg.gate_shape == "channel" else (n, 1)
        self.gamma = nn.Parameter(torch.full(gate_shape, float(cfg.gate_init)))
        with torch.random.fork_rng(devices=[]):  # the family's own init draws are discarded ...
            self.side = AutoModel.from_config(self.config, dtype=torch.get_default_dtype())
        self.side.set_input_embeddings(None)  # ... and the one-token embedding is dropped
        for m in decoder_layers(self.side).modules():  # PyTorch's default Linear init, in layer order
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                m.reset_parameters()
        self._states: list[torch.Tensor] | None = None
        for i, layer in enumerate(decoder_layers(self.side)):
            layer.register_forward_pre_hook(functools.partial(self._ladder, i), with_kwargs=True)
        self.up = nn.Linear(d_s, d)
        self.alpha = nn.Parameter(torch.full((d,), float(cfg.alpha_init)))

    def _ladder(self, i: int, module, args, kwargs):
        """Before side layer i: g = (1 - beta_i) * D_i(h_{i+1}) + beta_i * g (the ladder's mix)."""
        g = args[0] if args else kwargs["hidden_states"]
        beta = torch.sigmoid(self.gamma[i])
        mixed = (1 - beta) * self.down[i](self._states[i + 1].to(g.dtype)) + beta * g
        if args:
            return (mixed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": mixed}

    def forward(
        self, states: list[torch.Tensor], h_final: torch.Tensor, attention_mask, position_ids, cache=None
    ) -> torch.Tensor:
        """``states`` = [h_0, ..., h_N] (no grad); returns the fused final hidden state h (width d)."""
        dtype = self.up.weight.dtype
        g = self.down[0](states[0].to(dtype))
        self._states = states
        try:
            out = self.side(
                inputs_embeds=g,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **{cache_keyword(self.side.forward): cache},
            )
        finally:
            self._states = None
        side = self.up(out.last_hidden_state)
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

    def run_backbone(
        self, input_ids, attention_mask, position_ids, cache
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Backbone forward without autograd; returns [h_0..h_N] (h_0: the first layer's input, h_i: layer i's
        output, before the final norm) and FinalNorm(h_N)."""
        decoder = self.backbone.base_model
        layers = decoder_layers(self.backbone)
        states: list[torch.Tensor] = []

        def first_input(module, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        hooks += [
            layer.register_forward_hook(lambda m, i, o: states.append(o[0] if isinstance(o, tuple) else o))
            for layer in layers
        ]
        try:
            with torch.no_grad():
                out = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=cache is not None,
                    **{cache_keyword(decoder.forward): cache},
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
        mult, cap = logit_postprocessing(self.config)
        fused = self.fused_loss and cap is None and getattr(head, "bias", None) is None
        if labels is not None and self.training and fused:
            # Training: the frozen head's loss gradient is formed chunk by chunk; no [B, T, V] logits exist.
            # A logit multiplier (Granite) is folded into h: (m h) Wᵀ = m (h Wᵀ).
            h = h * mult if mult != 1.0 else h
            return CausalLMOutputWithPast(loss=frozen_head_cross_entropy(h, head.weight, labels), logits=None)
        logits = head_logits(self.backbone, h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def new_cache(self) -> QSTCache:
        from transformers import DynamicCache

        return QSTCache(DynamicCache(config=self.backbone.config), DynamicCache(config=self.qst.config))
