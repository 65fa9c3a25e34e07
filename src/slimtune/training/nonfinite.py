"""``train.on_nonfinite``: a step whose loss or gradient is not finite is not applied. It is skipped (counted and
logged), or the last good state is saved and the run stops; ten in a row stop it too, and so does any under an
engine that cannot skip a step (DeepSpeed). Every rank agrees on what is non-finite."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from slimtune.engines.base import Engine
from slimtune.methods.base import Adapted
from slimtune.training.faults import EXIT_NONFINITE, RunStopped

log = logging.getLogger(__name__)
MAX_SKIPS_IN_ROW = 10  # train.on_nonfinite: skip stops a run that only produces non-finite steps


class NonFiniteSteps:
    def __init__(self, policy: str, run_dir: Path, engine: Engine):
        self.policy, self.run_dir, self.engine = policy, run_dir, engine
        self.skipped = 0  # steps not applied
        self.in_row = 0

    def find(self, adapted: Adapted, losses: list[float]) -> str | None:
        """What is non-finite in this step (the loss, or a named gradient), or None; agreed by every rank.
        Under fp16 loss scaling the gradients are left to the scaler: an inf there is its signal to lower the
        scale (it skips that step itself), not a fault."""
        bad = next((f"loss {x}" for x in losses if not math.isfinite(x)), None)
        if bad is None and getattr(self.engine.acc, "scaler", None) is None:
            bad = f"gradient of {name}" if (name := adapted.nonfinite_grad()) else None
        if self.engine.agree([float(bad is not None)])[0] and bad is None:
            bad = "a non-finite loss or gradient on another rank"
        if bad is None:
            self.in_row = 0
        return bad

    def skip(self, step: int, fault: str, save: Callable[[], None], record: Callable[[dict], None]) -> None:
        """A non-finite step ``step`` (0-based): counted and logged, or ``save()`` and the run stopped."""
        self.skipped += 1
        self.in_row += 1
        what = f"step {step + 1}: non-finite {fault}"
        why = None
        if self.policy == "stop":
            why = "train.on_nonfinite: stop"
        elif self.engine.skip_refusal:
            why = self.engine.skip_refusal
        elif self.in_row >= MAX_SKIPS_IN_ROW:
            why = f"{MAX_SKIPS_IN_ROW} non-finite steps in a row"
        if why is not None:
            save()
            raise RunStopped(
                f"{what}; stopped ({why}). The state after step {step} is saved in "
                f"{self.run_dir / 'checkpoint'}; lower train.lr or check the data, then "
                f"`slimtune train --resume {self.run_dir}`",
                EXIT_NONFINITE,
            )
        log.warning("%s; the step is skipped (%d skipped so far)", what, self.skipped)
        record({"step": step + 1, "skipped_steps": self.skipped, "nonfinite": fault})

    def partly_stepped(self, step: int, fault: str, stepped: int) -> None:
        """A non-finite gradient under ``train.optimizer_in_backward``: the ``stepped`` parameters before it in
        backward have stepped, so the step cannot be skipped; the run stops without saving that state."""
        saved = self.run_dir / "checkpoint"
        raise RunStopped(
            f"step {step + 1}: non-finite {fault}; stopped (train.optimizer_in_backward: "
            f"{stepped} parameters had already stepped, so the step cannot be skipped; this state is not "
            "saved). "
            + (
                f"Resume the last checkpoint with `slimtune train --resume {self.run_dir}`"
                if saved.exists()
                else "No checkpoint was written before it (train.save_every)"
            )
            + "; lower train.lr or check the data",
            EXIT_NONFINITE,
        )
