"""SAT configuration (Ma et al., "Sparsity-Accelerated Training for Large Language Models", Findings ACL 2024) and
its omission-rate schedules.

Omission-rate schedules: piecewise-constant, non-increasing functions of training progress t / N.

The ladder (LORS) keeps r_max for the first ``sparse_frac`` of training, steps down through ``n_rungs`` equal
rungs r_max·(1 - i/(n_rungs+1)), and trains densely (rate 0, the unpatched forward) for the last ``dense_frac``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig

METRICS = ("uniform", "magnitude", "wanda", "maxip", "activation")
SELECTIONS = ("topk", "sampling")
SCHEDULES = ("ladder", "constant", "linear", "custom")
TARGETS = ("mlp", "attn")


@dataclass
class SATConfig(MethodConfig):
    """Each training step omits the least important MLP channels and attention heads by slicing the weights."""

    name: ClassVar[str] = "sat"
    rate: float = 0.5
    """Peak omission rate r_max: the fraction of MLP channels / query heads of every layer left out of a step."""
    targets: list[str] = field(default_factory=lambda: ["mlp", "attn"])
    """What is omitted: mlp (SwiGLU channels) and/or attn (query heads; GQA: k/v of a group kept while used)."""
    metric: str = "activation"
    """Neuron importance: activation (|silu(g)·u| / head-output norm from a dense no-grad pass, reused) |
    wanda (|W|·||x||) | maxip (|<x, g>|) | magnitude | uniform. Measured on SmolLM2: only activation keeps the
    sparse model usable at rate 0.5 (docs/methods/sat.md)."""
    selection: str = "topk"
    """topk (deterministic) or sampling without replacement with p ∝ (score + eps·mean)^(1/temperature)."""
    temperature: float = 1.0
    """Sharpness of sampling (lower = closer to top-k)."""
    schedule: str = "ladder"
    """Omission-rate schedule over training progress: ladder | constant | linear | custom (uses `rungs`)."""
    sparse_frac: float = 0.5
    """ladder: fraction of the steps at r_max."""
    n_rungs: int = 1
    """ladder: number of intermediate rungs between r_max and the dense phase."""
    dense_frac: float = 0.2
    """ladder: final fraction of the steps trained densely (rate 0)."""
    rungs: list[list[float]] = field(default_factory=list)
    """custom: [[progress, rate], ...] from progress 0, rates non-increasing, last rate 0."""
    min_keep_mlp: int = 1
    """Never keep fewer MLP channels than this."""
    min_keep_heads: int = 1
    """Never keep fewer query heads than this."""
    optimizer_mask: str = "none"
    """none (AdamW moves omitted rows by momentum/decay, as plain training would) or freeze_omitted (rows omitted
    in every micro-batch of a step keep their values through that optimizer step)."""
    lora_r: int = 0
    """0: full-parameter training. > 0: LoRA of this rank on the attention and MLP linears (base frozen), with
    the base and LoRA matrices sliced together."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (update × lora_alpha / lora_r)."""
    omit: str = "forward"
    """forward (SAT: omitted neurons are left out of the forward and the backward pass) | backward (an
    extension, "sparse backpropagation": the forward is dense, so the loss is the dense model's, and only the
    backward pass skips the omitted neurons: they get zero gradient and pass none to the layer input)."""
    dense_tokens: str = "none"
    """none (SAT: every token uses the kept channels) | labels: positions that predict a label token run the
    whole MLP, the other tokens the kept channels (as SparseLoRA keeps output tokens dense; an extension of
    SAT, docs/methods/sat.md). Costs little where answers are short next to their prompts."""
    layer_scale: dict[int, float] = field(default_factory=dict)
    """Per-layer multipliers of the omission rate, {layer index: factor}; 0 keeps that layer dense, missing
    layers use 1. The rate of a layer is min(rate_t × factor, 0.95). An extension of SAT (docs/methods/sat.md: uniform
    per-layer rates ignore layer sensitivity)."""
    seed: int = 0
    """Seed of the selection (each step, micro-batch, layer and module get their own generator)."""

    def needs(self) -> tuple[str, ...]:
        return ("peft",) if self.lora_r else ()

    def check(self) -> list[Problem]:
        out = positive(self, "temperature", "min_keep_mlp", "min_keep_heads")
        out += positive(self, "n_rungs", "lora_r", allow_zero=True)
        out += choice("metric", self.metric, METRICS)
        out += choice("selection", self.selection, SELECTIONS)
        out += choice("schedule", self.schedule, SCHEDULES)
        out += choice("omit", self.omit, ("forward", "backward"))
        out += choice("dense_tokens", self.dense_tokens, ("none", "labels"))
        out += choice("optimizer_mask", self.optimizer_mask, ("none", "freeze_omitted"))
        if not 0 <= self.rate < 1:
            out.append(("rate", f"{self.rate!r} must be in [0, 1)"))
        for t in self.targets:
            out += choice("targets", t, TARGETS)
        if not self.targets:
            out.append(("targets", "name at least one of mlp, attn"))
        for k in ("sparse_frac", "dense_frac"):
            if not 0 <= getattr(self, k) <= 1:
                out.append((k, f"{getattr(self, k)!r} must be in [0, 1]"))
        if self.sparse_frac + self.dense_frac > 1:
            out.append(("dense_frac", "sparse_frac + dense_frac must be <= 1"))
        if not isinstance(self.layer_scale, dict):
            out.append(("layer_scale", "must be a mapping {layer index: factor}"))
        else:
            for k, v in self.layer_scale.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    out.append((f"layer_scale.{k}", "keys must be layer indices (integers >= 0)"))
                elif not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    out.append((f"layer_scale.{k}", f"{v!r} must be a number >= 0"))
        if self.schedule == "custom":
            try:
                OmissionSchedule.from_rungs(self.rungs)
            except ValueError as e:
                out.append(("rungs", str(e)))
        return out


# ---------------------------------------------------------------- omission-rate schedules


@dataclass(frozen=True)
class OmissionSchedule:
    """``rungs``: ((progress_0 = 0, rate_0), (progress_1, rate_1), ...), progress increasing, rates
    non-increasing. ``rate(t, N) = rate_k`` for ``progress_k <= t/N < progress_{k+1}``."""

    rungs: tuple[tuple[float, float], ...]

    @classmethod
    def from_rungs(cls, rungs) -> OmissionSchedule:
        try:
            pairs = tuple((float(u), float(r)) for u, r in rungs)
        except (TypeError, ValueError):
            raise ValueError("expected a list of [progress, rate] pairs") from None
        if not pairs or pairs[0][0] != 0.0:
            raise ValueError("the first rung must start at progress 0")
        for (u0, r0), (u1, r1) in zip(pairs, pairs[1:]):
            if not u1 > u0:
                raise ValueError(f"progress must increase ({u0} then {u1})")
            if r1 > r0:
                raise ValueError(f"rates must not increase ({r0} then {r1})")
        if any(not 0 <= r < 1 for _, r in pairs) or any(u > 1 for u, _ in pairs):
            raise ValueError("rates must be in [0, 1) and progress in [0, 1]")
        return cls(pairs)

    @classmethod
    def constant(cls, rate: float) -> OmissionSchedule:
        return cls(((0.0, rate),))

    @classmethod
    def linear(cls, rate: float, steps: int = 10) -> OmissionSchedule:
        """A staircase approximating r_max → 0 linearly (``steps`` rungs, the last at rate 0)."""
        return cls(tuple((i / steps, rate * (1 - i / (steps - 1))) for i in range(steps)))

    @classmethod
    def ladder(cls, rate: float, sparse_frac: float, n_rungs: int, dense_frac: float) -> OmissionSchedule:
        rungs = [(0.0, rate)]
        middle = 1.0 - dense_frac - sparse_frac
        for i in range(1, n_rungs + 1):
            rungs.append((sparse_frac + (i - 1) * middle / n_rungs, rate * (1 - i / (n_rungs + 1))))
        rungs.append((1.0 - dense_frac, 0.0))
        # drop empty rungs (e.g. sparse_frac = 0), keeping the later one
        out: list[tuple[float, float]] = []
        for u, r in rungs:
            if out and out[-1][0] == u:
                out[-1] = (u, r)
            else:
                out.append((u, r))
        return cls.from_rungs(out)

    def rate(self, step: int, total: int | None) -> float:
        """The rate of optimizer step ``step`` of ``total``; without a total (benchmarks), the first rung."""
        if not total:
            return self.rungs[0][1]
        starts = [u for u, _ in self.rungs]
        return self.rungs[bisect.bisect_right(starts, step / total) - 1][1]

    def expected_compute(self, omittable_share: float) -> float:
        """C / C_dense = Σ_k w_k (1 - φ r_k) for a run with this schedule (φ: FLOP share omission can remove)."""
        ends = [u for u, _ in self.rungs[1:]] + [1.0]
        return sum((e - u) * (1 - omittable_share * r) for (u, r), e in zip(self.rungs, ends))


def from_config(cfg) -> OmissionSchedule:
    if cfg.schedule == "constant":
        return OmissionSchedule.constant(cfg.rate)
    if cfg.schedule == "linear":
        return OmissionSchedule.linear(cfg.rate)
    if cfg.schedule == "custom":
        return OmissionSchedule.from_rungs(cfg.rungs)
    return OmissionSchedule.ladder(cfg.rate, cfg.sparse_frac, cfg.n_rungs, cfg.dense_frac)
