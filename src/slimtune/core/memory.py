"""Memory accounting: bytes by (device, dtype, role), optimizer state, process peaks, host<->device traffic."""

from __future__ import annotations

import resource
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

ROLES = ("frozen_weights", "trainable", "gradients", "optimizer", "buffers", "host_offloaded")


def _nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds for ``t`` (a sharded DTensor: this rank's shard)."""
    local = getattr(t, "to_local", None)
    t = local() if callable(local) else t
    return t.numel() * t.element_size()


def tensor_bytes(model: nn.Module) -> dict[tuple[str, str, str], int]:
    """Bytes keyed by (device, dtype, role) for parameters, their gradients and buffers (each storage once)."""
    out: dict[tuple[str, str, str], int] = defaultdict(int)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        role = "trainable" if p.requires_grad else "frozen_weights"
        out[(str(p.device), str(p.dtype).removeprefix("torch."), role)] += _nbytes(p)
        if p.grad is not None:
            out[(str(p.grad.device), str(p.grad.dtype).removeprefix("torch."), "gradients")] += _nbytes(
                p.grad
            )
    for b in model.buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        # quantized weights live in buffers of integer dtype: they are frozen weights, not scratch buffers
        role = "frozen_weights" if not b.is_floating_point() or b.ndim >= 2 else "buffers"
        out[(str(b.device), str(b.dtype).removeprefix("torch."), role)] += _nbytes(b)
    return dict(out)


def module_bytes_by_role(model: nn.Module) -> dict[str, int]:
    totals = dict.fromkeys(ROLES, 0)
    for (_, _, role), n in tensor_bytes(model).items():
        totals[role] += n
    return totals


def optimizer_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += _nbytes(v)
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (bytes; psutil: Linux's VmRSS, and the same on macOS and Windows)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def runtime_rss_bytes(preload: tuple[str, ...] = ()) -> int:
    """The RSS a training process carries before holding any model or data: Python, the imported libraries and
    the code paths they load lazily on first use (autograd, a matmul, an Adam/AdamW step), exercised here on a
    one-element problem. Peak RSS minus this is the memory a CPU job's own tensors and buffers needed (the CPU
    analogue of CUDA's max_memory_allocated). ``preload``: modules the job imports anyway (e.g. peft)."""
    import importlib

    for name in preload:
        importlib.import_module(name)
    w = torch.zeros(4, 4, requires_grad=True)
    (w @ w).sum().backward()
    for opt in (torch.optim.Adam([w]), torch.optim.AdamW([w])):
        opt.step()
    return current_rss_bytes()


def device_peak_bytes(device: torch.device) -> int:
    """The peak that matters: CUDA max allocated on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


@dataclass
class TrafficCounter:
    """Bytes moved host->device and device->host, by a label (e.g. the layer); methods increment it."""

    h2d: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    d2h: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, direction: str, label: str, nbytes: int) -> None:
        getattr(self, direction)[label] += int(nbytes)

    def totals(self) -> dict[str, int]:
        return {"h2d": sum(self.h2d.values()), "d2h": sum(self.d2h.values())}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
