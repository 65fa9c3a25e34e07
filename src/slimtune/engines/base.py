"""The interface between the trainer and the way a job runs over processes.

The trainer calls an :class:`Engine` in this order and never asks which one it has:

1. :meth:`~Engine.place_model` (the model on its device: wrapped for DDP, sharded for FSDP2), after any
   checkpoint was read into the whole model;
2. the trainer builds AdamW once over the placed parameters (fused where :attr:`~Engine.fused_adamw`) and its
   schedule, loads a checkpoint's optimizer state into it, then :meth:`~Engine.load_optimizer_state` (FSDP cuts
   the whole moments to each rank's shards) and :meth:`~Engine.prepare_optimizer`;
3. per micro-batch, forward and :meth:`~Engine.backward` inside :meth:`~Engine.accumulating`;
4. per step, :meth:`~Engine.step` (clipping and AdamW, or the engine's own step);
5. to save, :meth:`~Engine.whole_model` and :meth:`~Engine.optimizer_state` (the single-process layout, so a
   checkpoint resumes under any engine and process count); :meth:`~Engine.agree` and :meth:`~Engine.per_rank`
   for what every rank must decide or report together.

One implementation each: :class:`~slimtune.engines.ddp.DDPEngine` (one process, or DDP through accelerate),
:class:`~slimtune.engines.fsdp.FSDPEngine` (FSDP2) and :class:`~slimtune.engines.deepspeed.DeepSpeedEngine`
(ZeRO-2/3); :func:`~slimtune.engines.support.make_engine` picks it from the support table.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


class Engine:
    """Defaults every engine shares (one process behaves as any engine of one rank)."""

    name = "single"
    """What ran, as results.json reports it (``single``, ``ddp``, ``fsdp``, ``deepspeed ZeRO-3``)."""
    fused_adamw = True
    """Whether AdamW may use PyTorch's fused kernel (not over DTensor shards or ZeRO partitions)."""
    loss_outside_forward = True
    """Whether the head's weight is whole outside the model's forward (the chunked loss applies it there)."""
    skip_refusal: str | None = None
    """Why a non-finite step cannot be skipped under this engine (None: it can)."""

    def __init__(self, acc, grad_accum: int, max_grad_norm: float | None):
        self.acc, self.grad_accum, self.max_grad_norm = acc, grad_accum, max_grad_norm

    def place_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After a whole (single-process) optimizer state was loaded into ``optimizer``."""

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) as the loop steps them."""
        return model, self.acc.prepare(optimizer)

    def accumulating(self, model: nn.Module, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward; ``last``: the step's last micro-batch."""
        return nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        self.acc.backward(loss / self.grad_accum)

    def step(self, model: nn.Module, optimizer, params: list[nn.Parameter]) -> float | None:
        """Clip to ``max_grad_norm`` and step AdamW; the gradients' global norm before clipping (None: none)."""
        norm = None if self.max_grad_norm is None else self.clip(params)
        optimizer.step()
        return norm

    def clip(self, params: list[nn.Parameter]) -> float:
        return float(self.acc.clip_grad_norm_(params, self.max_grad_norm))

    def whole_model(self, model: nn.Module) -> AbstractContextManager:
        """A context in which the method's parameters are whole on every rank (a collective where sharded)."""
        return nullcontext()

    def optimizer_state(self, optimizer) -> dict | None:
        """AdamW's state in the single-process layout to save (None: ``optimizer.state_dict()`` is it)."""
        return None

    def agree(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` reduced over the ranks (``sum`` or ``max``); the values themselves in one process."""
        if self.acc.num_processes == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return [float(v) for v in self.acc.reduce(t, op)]

    def per_rank(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order (a collective under several processes)."""
        if self.acc.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return [int(v) for v in gather_object([value])]
