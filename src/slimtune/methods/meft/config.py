"""MEFT configuration (Hao et al., "MEFT: Memory-Efficient Fine-Tuning through Sparse Adapter", ACL 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig


@dataclass
class MEFTConfig(MethodConfig):
    """A wide ReLU parallel adapter beside every FFN, kept in host memory; per token only its top-K neurons."""

    name: ClassVar[str] = "meft"
    r: int = 4096
    """Key/value neurons per layer (the adapter's width)."""
    k: int = 64
    """Neurons each token uses (per-token top-K)."""
    experts: int = 64
    """Key-Experts: the r keys split into this many contiguous blocks probed by a router (0 = brute force)."""
    n_probe: int = 8
    """Experts the router probes per token."""
    semantics: str = "mask"
    """mask: each token uses only its own top-K neurons (the paper's published numbers); union: every token uses
    every gathered neuron, gated by ReLU (the paper's Eq. 4)."""
    cap: int = 0
    """Most rows gathered per layer and micro-batch (0 = no cap); the rows with the highest summed activation
    are kept."""
    init_std: float = 0.0
    """Standard deviation of the keys at init (0 = the model's initializer_range). Values start at 0."""
    router_scale: float = 50.0
    """Router row i starts at this times the mean of expert i's keys (the reference's choice)."""
    train_keys: bool = True
    """Train keys and router too (false: values only)."""
    input_norm: float = 4.0
    """The mean L2 norm the adapter sees its input (the MLP input) at: one factor for the whole model, measured
    once on the first training batch (0 = the raw input). The adapter's change per step grows with the square of
    its input's norm (key activation x router gate), so without it the learning rate that trains depends on the
    model: SmolLM2-135M's MLP inputs average 3.9, Qwen2.5-0.5B's 43 (docs/methods/meft.md)."""
    dense_emulation: bool = False
    """Adam-update every row every step (torch AdamW on the dense, masked adapter: the reference code's GPU
    simulation) instead of only the touched rows (lazy Adam, the default)."""

    def check(self) -> list[Problem]:
        out = positive(self, "r", "k", "n_probe", "router_scale")
        out += positive(self, "experts", "cap", "init_std", "input_norm", allow_zero=True)
        out += choice("semantics", self.semantics, ("mask", "union"))
        if self.k > self.r:
            out.append(("k", f"{self.k} must be <= r ({self.r})"))
        if self.experts:
            if self.r % self.experts:
                out.append(
                    (
                        "experts",
                        f"{self.experts} does not divide r={self.r} (choose a divisor, e.g. 64 for 4096)",
                    )
                )
            elif self.n_probe > self.experts:
                out.append(("n_probe", f"{self.n_probe} must be <= experts ({self.experts})"))
            elif self.n_probe * (self.r // self.experts) < self.k:
                out.append(
                    (
                        "k",
                        f"{self.k} exceeds the candidates per token (n_probe x r/experts = "
                        f"{self.n_probe * (self.r // self.experts)})",
                    )
                )
        if self.cap and self.cap < self.k:
            out.append(("cap", f"{self.cap} must be 0 or >= k ({self.k})"))
        return out
