"""The host-resident adapter store and its lazy (row-sparse) Adam.

One store per adapted layer: keys and values [r, d] in fp32 (pinned on CUDA hosts), their gradient buffers, Adam's
first/second moments and a per-row step count, all in host memory. Only the rows a micro-batch selected travel to
the compute device; their gradients come back into the host buffers (``index_add``), and at the optimizer step only
the rows touched since the last step are updated, each with its own bias correction (step count):

    t_j += 1;  m_j = β1 m_j + (1-β1) g_j;  v_j = β2 v_j + (1-β2) g_j²
    w_j ← w_j (1 - lr·wd) - lr/(1-β1^t_j) · m_j / (sqrt(v_j)/sqrt(1-β2^t_j) + eps)

which is torch's AdamW restricted to the touched rows (identical when every row is touched every step). Rows not
touched are bit-identical before and after a step, moments and step counts included.

The keys and values are ``nn.Parameter`` objects whose ``.grad`` is the host buffer, so the trainer's global-norm
clipping sees them; they are not registered in the model (``model.to(device)`` never moves them) and not in the
trainer's optimizer.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerStore:
    def __init__(self, r: int, d: int, init_std: float, generator: torch.Generator, pin: bool):
        self.keys = nn.Parameter(torch.randn(r, d, generator=generator) * init_std)
        self.values = nn.Parameter(torch.zeros(r, d))
        self.state = {}
        for p in (self.keys, self.values):
            p.grad = torch.zeros_like(p)
            self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if pin:
            for t in self.tensors():
                t.data = t.data.pin_memory()
        self.step = torch.zeros(r, dtype=torch.int64)
        self.touched = torch.zeros(r, dtype=torch.bool)

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for p in (self.keys, self.values):
            out += [p.data, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]]
        return out

    @torch.no_grad()
    def add_grad(self, which: str, rows: torch.Tensor, grad: torch.Tensor) -> None:
        p = self.keys if which == "keys" else self.values
        if p.grad is None:  # something (an optimizer's zero_grad(set_to_none=True)) dropped the buffer
            p.grad = torch.zeros_like(p)
        p.grad.index_add_(0, rows, grad.to(p.grad.device, p.grad.dtype))
        self.touched[rows] = True

    @torch.no_grad()
    def all_reduce_rows(self, group=None) -> None:
        """Data parallel: every rank ends with the union of the rows touched on any rank and, for those rows,
        the mean of the ranks' gradients (what DDP does for the model's parameters), so each rank's lazy Adam
        makes the same update. Only the union rows travel; a no-op in a single process."""
        import torch.distributed as dist

        from slimtune.core.processes import world_size

        world = world_size(group)
        if world == 1:
            return
        touched = self.touched.to(torch.int32)
        dist.all_reduce(touched, op=dist.ReduceOp.MAX, group=group)
        self.touched.copy_(touched.bool())
        rows = self.touched.nonzero().flatten()
        for p in (self.keys, self.values):
            g = p.grad[rows].contiguous()
            dist.all_reduce(g, group=group)
            p.grad[rows] = g.div_(world)

    @torch.no_grad()
    def adam_step(
        self,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        train_keys: bool,
        dense=False,
    ):
        if dense:  # every row, as AdamW on the dense adapter would
            self.touched.fill_(True)
        rows = self.touched.nonzero().flatten()
        if rows.numel():
            self.step[rows] += 1
            t = self.step[rows].to(torch.float64)[:, None]
            step_size = (lr / (1 - betas[0] ** t)).to(torch.float32)
            bc2_sqrt = (1 - betas[1] ** t).sqrt().to(torch.float32)
            for p in (self.keys, self.values) if train_keys else (self.values,):
                g = p.grad[rows]
                m = self.state[p]["exp_avg"][rows].lerp_(g, 1 - betas[0])
                v = self.state[p]["exp_avg_sq"][rows].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                w = p.data[rows].mul_(1 - lr * weight_decay)
                w.sub_(m.div(v.sqrt().div_(bc2_sqrt).add_(eps)).mul_(step_size))
                self.state[p]["exp_avg"][rows] = m
                self.state[p]["exp_avg_sq"][rows] = v
                p.data[rows] = w
        self.zero_grad()

    @torch.no_grad()
    def zero_grad(self) -> None:
        for p in (self.keys, self.values):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rows = self.touched.nonzero().flatten()
        if rows.numel():
            self.keys.grad[rows] = 0
            self.values.grad[rows] = 0
        self.touched.zero_()

    def grads_finite(self) -> bool:
        rows = self.touched.nonzero().flatten()
        return bool(
            torch.isfinite(self.keys.grad[rows]).all() and torch.isfinite(self.values.grad[rows]).all()
        )

    def nbytes(self) -> dict[str, int]:
        weights = self.keys.numel() * 4 * 2
        return {
            "host_offloaded": weights,  # keys + values
            "host_gradients": weights,
            "host_optimizer": weights * 2 + self.step.numel() * 8,
        }
