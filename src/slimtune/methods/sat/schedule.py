"""Omission-rate schedules: piecewise-constant, non-increasing functions of training progress t / N.

The ladder (LORS) keeps r_max for the first ``sparse_frac`` of training, steps down through ``n_rungs`` equal
rungs r_max·(1 - i/(n_rungs+1)), and trains densely (rate 0, the unpatched forward) for the last ``dense_frac``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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
