"""``train.optimizer_in_backward``: AdamW steps each parameter as soon as backward has formed its whole gradient,
and the gradient is freed right there, so the gradients of all parameters never exist at once.

In full fine-tuning the end of backward is where the peak is: every parameter, its gradient and AdamW's two
moments (4 × the parameters in fp32), plus what backward still holds (docs/memory.md). Stepping inside backward
takes the gradients out of that sum. PyTorch's own pattern (``Tensor.register_post_accumulate_grad_hook``, its
tutorial "How to save memory by fusing the optimizer step into the backward pass"); torchtune's
``optimizer_in_bwd`` is the same idea. What it gives up, refused with one line each: gradient clipping (it needs
the norm of every gradient before any step), gradient accumulation (each micro-batch would step), several
processes (DDP/FSDP reduce the gradients after backward), fp16 loss scaling, and methods that work on the
gradients between backward and the step (SAT, MEFT).

The optimizer stays one ``torch.optim.AdamW`` over every parameter, so its state, the LR schedule and
checkpoints are the same as in an ordinary step. Inside the hook only the parameter at hand has a gradient (the
others were stepped and freed, or are not formed yet), and ``optimizer.step()`` updates exactly the parameters that
have one: the same per-tensor update, bit for bit (``tests/training/test_in_backward.py``).

A non-finite gradient cannot be skipped as a whole step (the parameters before it in backward have stepped): the
hook stops stepping from that parameter on and the trainer stops the run without saving the partly stepped state
(a non-finite *loss* is caught before backward and skipped as usual, ``train.on_nonfinite``).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.methods.base import Adapted, nonfinite


def refusal(adapted, num_processes: int, scaler) -> str | None:
    """Why ``train.optimizer_in_backward`` cannot run here (one line), or None."""
    if num_processes > 1:
        return (
            f"not built for a {num_processes}-process run (the gradients are reduced across processes after "
            "backward, so no parameter may step inside it)"
        )
    if scaler is not None:
        return "not with fp16 loss scaling (the scaler unscales and checks every gradient before the step)"
    own = [
        name
        for name in ("after_backward", "optimizer_step")
        if getattr(type(adapted), name) is not getattr(Adapted, name)
    ]
    if own:
        return (
            f"method '{adapted.cfg.name}' works on the gradients between backward and the optimizer step "
            f"({', '.join(own)})"
        )
    return None


class StepInBackward:
    """Hooks that step ``optimizer`` for each of ``named`` parameters when its gradient is whole, then free it.

    The finiteness of each gradient is checked on its device: a running flag, handed to PyTorch's fused AdamW as
    its ``found_inf`` (the input GradScaler uses), so from the first non-finite gradient on no parameter steps,
    without a host sync per parameter (a non-fused AdamW reads the flag on the host). :attr:`fault` reads it once
    after backward; :meth:`start` clears it before each step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named: list[tuple[str, nn.Parameter]],
        check_finite: bool = True,
    ):
        """``check_finite`` False: no check (the planner's fake tensors hold no values)."""
        self.optimizer, self.check_finite = optimizer, check_finite
        self.fused = all(g.get("fused") for g in optimizer.param_groups)
        self._names = {id(p): n for n, p in named}
        self._seen: list[tuple[str, torch.Tensor | None]] = []  # (name, running flag) in the order stepped
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in named]

    def start(self) -> None:
        self._seen = []

    @property
    def fault(self) -> str | None:
        """``gradient of NAME``: the first parameter of this backward whose gradient was non-finite, or None."""
        flags = [f for _, f in self._seen if f is not None]
        if not flags or not float(flags[-1]):
            return None
        return f"gradient of {self._seen[self.stepped][0]}"

    @property
    def stepped(self) -> int:
        """How many parameters stepped in this backward (all whose gradient formed before a non-finite one)."""
        return next((i for i, (_, f) in enumerate(self._seen) if f is not None and float(f)), len(self._seen))

    def _hook(self, p: nn.Parameter) -> None:
        flag = None
        if self.check_finite:
            flag = nonfinite(p.grad)
            if self._seen and self._seen[-1][1] is not None:
                flag = torch.maximum(flag, self._seen[-1][1].to(flag.device))
        self._seen.append((self._names[id(p)], flag))
        if flag is None:
            self.optimizer.step()  # only p has a gradient now: the step updates p alone
        elif self.fused:
            self.optimizer.found_inf = flag  # the fused kernel skips the update (and the step count) where 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not float(flag):
            self.optimizer.step()
        p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
