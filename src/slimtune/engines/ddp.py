"""One process, or DDP through accelerate (every rank holds the model; gradients averaged after the last
micro-batch of a step)."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from slimtune.engines.base import Engine


class DDPEngine(Engine):
    def __init__(self, acc, grad_accum: int, max_grad_norm: float | None):
        super().__init__(acc, grad_accum, max_grad_norm)
        self.name = "ddp" if acc.num_processes > 1 else "single"

    def place_model(self, model: nn.Module) -> nn.Module:
        return self.acc.prepare(model.to(self.acc.device))

    def accumulating(self, model: nn.Module, last: bool):
        # (DDP reduces in backward unless told not to: only the last micro-batch syncs)
        return nullcontext() if last or self.acc.num_processes == 1 else self.acc.no_sync(model)
