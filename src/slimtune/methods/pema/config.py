"""PEMA configuration (Kim et al., "PEMA: An Offsite-Tunable Plug-in External Memory Adaptation for Language
Models", NAACL 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig


@dataclass
class PEMAConfig(MethodConfig):
    """Offsite tuning: a bottleneck adapter trained on an external memory of the owner's final-layer states."""

    name: ClassVar[str] = "pema"
    r: int = 512
    """Bottleneck rank (A: r x d, B_rct and B_pd: d x r)."""
    alpha: float = 1.0
    """Scale numerator: z = (alpha / r) A drop(x)."""
    dropout: float = 0.2
    """Dropout on the adapter input while training (a separate mask per branch)."""
    kappa: float = 0.2
    """Stage 2 loss: kappa * reconstruction MSE + (1 - kappa) * cross-entropy through the frozen head."""
    lr: float = 1e-3
    """Adam learning rate of both stages (no weight decay, no schedule)."""
    batch_stage1: int = 4096
    """Memory rows per step in stage 1 (reconstruction)."""
    batch_stage2: int = 512
    """Memory rows per step in stage 2."""
    epochs_stage1: int = 20
    """Most epochs of stage 1."""
    epochs_stage2: int = 40
    """Most epochs of stage 2 (early stopping may end it sooner)."""
    eval_every: int = 20
    """Validate on the dev memory every this many steps; stop when the loss is above both previous checks."""
    init_a2_from_stage1: bool = False
    """Start stage 2's A from stage 1's (the reference starts it fresh)."""
    key_scale: bool = True
    """Divide memory keys by their RMS (computed by the data owner; predictions unchanged, MSE comparable)."""
    memory_mode: str = "free_running"
    """free_running: the owner's own greedy trajectory paired with gold targets by position (targets stay private);
    teacher_forced: states along the gold targets (sends targets to the owner: needs allow_target_disclosure)."""
    append_stop_target: bool = True
    """Add one row (state after the last target, stop token) per example so PEMA can end a sentence."""
    allow_target_disclosure: bool = False
    """Required for memory_mode: teacher_forced (the owner then sees the gold targets)."""
    max_new_tokens: int = 48
    """Greedy steps when building the memory and when generating."""
    lambda_max: float = 0.9
    """Mixing weight of PEMA's distribution: P = lambda P_PEMA + (1 - lambda) P_LM."""
    gradual_unrolling: bool = True
    """lambda(0) = lambda_max, lambda(t) = (lambda_max (1 - min(t, L-1)/L))^2 (off: constant lambda_max)."""
    gu_ratio: float = 1.5
    """GU horizon L per sequence = ceil(gu_ratio x source tokens) (never the test reference's length)."""
    gu_min: float = 0.0
    """GU's minimum share m (the reference CLI's percentage / 100; 0 in the paper): lambda(t) = (1 - m) c_t^2 + m,
    so PEMA keeps at least this weight (and its stop signal) late in long outputs."""
    gu_horizon: str = "source"
    """source: L = ceil(gu_ratio x source tokens) | prompt_and_source: L = prompt tokens + ceil(gu_ratio x source
    tokens), the test-time analogue of the reference's prompt + reference length."""
    dev_fraction: float = 0.1
    """Share of the training pairs whose memory is used for early stopping."""
    seed: int = 123
    """Seed of initialisation, dropout and batching."""

    def check(self) -> list[Problem]:
        out = positive(self, "r", "alpha", "lr", "batch_stage1", "batch_stage2", "eval_every", "gu_ratio")
        out += positive(self, "epochs_stage1", "epochs_stage2", "max_new_tokens")
        out += choice("memory_mode", self.memory_mode, ("free_running", "teacher_forced"))
        for k in ("dropout", "kappa", "lambda_max", "dev_fraction", "gu_min"):
            if not 0 <= getattr(self, k) <= 1:
                out.append((k, f"{getattr(self, k)!r} must be in [0, 1]"))
        out += choice("gu_horizon", self.gu_horizon, ("source", "prompt_and_source"))
        if self.memory_mode == "teacher_forced" and not self.allow_target_disclosure:
            out.append(
                (
                    "memory_mode",
                    "teacher_forced sends the gold targets to the model owner; set "
                    "allow_target_disclosure: true to accept that",
                )
            )
        return out
