"""PST configuration (Li et al., "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning", IJCAI 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimtune.core.schema import Problem, choice, positive
from slimtune.methods.base import MethodConfig


@dataclass
class PSTConfig(MethodConfig):
    """Sparse-aware LoRA: mask = top-k of |W0 + βUV| + α1·AB + α2·(R ⊕ C) per layer, on a cubic schedule."""

    name: ClassVar[str] = "pst"
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Linears to sparsify, by name suffix (``q_proj``) or regular expression on the full name (``re:...``);
    ``all-linear``: every ``nn.Linear`` but the LM head (on a Llama: q/k/v/o/gate/up/down_proj)."""
    weight_rank: int = 8
    """r_w: rank of the weight update U V."""
    weight_beta: float = 1.0
    """β: the update is W0 + β U V (no α/r scaling, as in the reference)."""
    score_rank: int = 8
    """r_m: rank of the low-rank score A B."""
    alpha_lowrank: float = 1.0
    """α1: weight of A B in the score."""
    alpha_struct: float = 1.0
    """α2: weight of the row/column scores R ⊕ C."""
    sparsity: float = 0.5
    """s_f: final fraction of zero weights in every targeted linear (2:4 requires 0.5)."""
    init_sparsity: float = 0.0
    """s_i: sparsity during warm-up."""
    warmup_frac: float = 0.1
    """Fraction of the steps before pruning starts."""
    cooldown_frac: float = 0.3
    """Final fraction of the steps trained at s_f (with the N:M rule when pattern is N:M)."""
    pattern: str = "unstructured"
    """unstructured, or N:M such as 2:4 (N kept of every M consecutive inputs) during cool-down and export."""
    nm_schedule: str = "gradual"
    """N:M patterns: gradual (every mask before the cool-down prunes only entries an N:M mask may prune, the
    lowest scores first, so reaching the target *is* the N:M mask: no jump when the cool-down starts) | switch
    (the spec's recipe: unstructured pruning up to the target, the N:M rule from the cool-down on; measured
    worse on SmolLM2, docs/methods/pst.md)."""
    scope: str = "local"
    """Which scores compete for the p = floor(n·k·s) pruned entries of a layer: local (the whole layer, the paper)
    | row (an extension: each output row loses floor(k·s), the < n left over go to the rows whose next score is
    lowest — Wanda's per-output comparison group; the row score R then no longer moves the mask). Unstructured
    only: N:M masks are already per group."""
    score_grad_to_weight: bool = True
    """Let the |W| term of the score send gradient into U, V (the reference's behaviour)."""
    mask_update_interval: int = 1
    """Recompute masks every this many optimizer steps (masks are cached while the parameters are unchanged)."""
    extra_trainable: list[str] = field(default_factory=list)
    """Module names (suffix match) trained in full next to PST, e.g. a task head."""
    score_prior: str = "magnitude"
    """The data-free term of the score: magnitude (|W|, the paper) | wanda (an extension: |W_ij|·c_j with c_j the
    root-mean-square of input feature j over the training tokens seen so far, divided by its mean over j so the
    term keeps |W|'s scale; refreshed after every optimizer step; Sun et al.'s Wanda pruning criterion)."""
    distill_weight: float = 0.0
    """γ (an extension; 0 = off, the paper): add γ·KL(teacher ‖ model) over the tokens the task loss ignores
    (prompt and context, not padding), the teacher being the same network without masks (``distill_from``). The
    task loss trains only the answer tokens; this term asks the pruned model to keep predicting the context as
    the dense one does. Costs one extra no-grad forward per micro-batch."""
    distill_from: str = "base"
    """base: the frozen W0 (the model before fine-tuning) | dense: the current W0 + βUV without the mask."""
    distill_temperature: float = 1.0
    """Softmax temperature of both distributions in the distillation term (the term is scaled by T²)."""
    init: str = "reference"
    """reference: U, A ~ N(0, 1); kaiming: kaiming-uniform U, A. V, B, R, C start at 0 either way."""

    def nm(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = (int(v) for v in self.pattern.split(":"))
        return n, m

    def check(self) -> list[Problem]:
        out = positive(self, "weight_rank", "score_rank", "mask_update_interval")
        out += choice("init", self.init, ("reference", "kaiming"))
        out += choice("nm_schedule", self.nm_schedule, ("switch", "gradual"))
        out += choice("score_prior", self.score_prior, ("magnitude", "wanda"))
        out += choice("scope", self.scope, ("local", "row"))
        out += choice("distill_from", self.distill_from, ("base", "dense"))
        if self.distill_weight < 0:
            out.append(("distill_weight", f"{self.distill_weight!r} must be >= 0"))
        if self.distill_temperature <= 0:
            out.append(("distill_temperature", f"{self.distill_temperature!r} must be > 0"))
        if self.scope == "row" and self.pattern != "unstructured":
            out.append(
                ("scope", f"'row' applies to unstructured sparsity; pattern {self.pattern} is per group")
            )
        for k in ("sparsity", "init_sparsity"):
            if not 0 <= getattr(self, k) < 1:
                out.append((k, f"{getattr(self, k)!r} must be in [0, 1)"))
        if self.init_sparsity > self.sparsity:
            out.append(("init_sparsity", "must not exceed sparsity"))
        for k in ("warmup_frac", "cooldown_frac"):
            if not 0 <= getattr(self, k) < 1:
                out.append((k, f"{getattr(self, k)!r} must be in [0, 1)"))
        if self.warmup_frac + self.cooldown_frac >= 1:
            out.append(("cooldown_frac", "warmup_frac + cooldown_frac must be < 1 (no pruning window left)"))
        if not self.target_modules:
            out.append(("target_modules", "name at least one linear"))
        if self.pattern != "unstructured":
            try:
                n, m = self.nm()
                ok = 0 < n < m
            except ValueError:
                ok = False
            if not ok:
                out.append(
                    ("pattern", f"{self.pattern!r} is not 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")
                )
            elif abs(self.sparsity - (1 - n / m)) > 1e-9:
                out.append(
                    (
                        "sparsity",
                        f"pattern {self.pattern} fixes sparsity at {1 - n / m:g}, got {self.sparsity!r}",
                    )
                )
        return out
