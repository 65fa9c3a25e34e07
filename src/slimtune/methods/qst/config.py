"""QST configuration (Zhang et al., "Quantized Side Tuning", ACL 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig

DOWNSAMPLES = ("adapter", "lora", "linear", "maxpool", "avgpool")


@dataclass
class QSTConfig(MethodConfig):
    """Quantized side tuning: a 4-bit frozen backbone run without autograd feeds a side network of width d/r."""

    name: ClassVar[str] = "qst"
    r: int = 16
    """Reduction factor: side width d/r and side FFN width d_ff/r (heads kept, head_dim shrinks)."""
    downsample: str = "adapter"
    """How each layer's hidden state is reduced to side width: adapter | lora | linear | maxpool | avgpool."""
    rank: int = 16
    """Bottleneck rank of the adapter/lora downsamples."""
    dropout: float = 0.1
    """Dropout inside the adapter/lora downsamples (applied when > 0; the reference code never applied it)."""
    gate_shape: str = "channel"
    """Ladder gate beta_i = sigmoid(gamma_i): one gamma per side channel ('channel') or one per layer ('scalar')."""
    gate_init: float = 0.0
    """Initial gamma (0 -> beta = 0.5, the paper's value; the reference code used 0.5)."""
    alpha_init: float = 1.0
    """Initial output mix alpha in h = alpha*h_N + (1-alpha)*U(s); 1.0 starts exactly at the base model."""
    quantize: bool = True
    """Store the backbone's decoder linears in 4-bit NF4 (off: keep them in full precision, LST-like)."""
    double_quant: bool = True
    """Double-quantize the NF4 block scales."""
    backend: str = "auto"
    """NF4 backend: bitsandbytes | torch | auto."""
    init: str = "random"
    """Side layers' initial weights: random (the QST paper) | backbone (Ladder Side-Tuning's structured pruning
    of the backbone: each side tensor is the backbone tensor's top-magnitude sub-block; see qst/prune.py)."""
    fused_loss: bool = True
    """Training loss through the frozen head chunk by chunk: no [B, T, vocab] logits (training outputs have
    ``logits=None``); eval and generation always return logits."""

    def check(self) -> list[Problem]:
        out = positive(self, "r", "rank")
        out += choice("downsample", self.downsample, DOWNSAMPLES)
        out += choice("gate_shape", self.gate_shape, ("channel", "scalar"))
        out += choice("backend", self.backend, ("auto", "bitsandbytes", "torch"))
        out += choice("init", self.init, ("random", "backbone"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", f"{self.dropout!r} must be in [0, 1)"))
        return out
