"""The trainer's AdamW and learning-rate schedule (also what `slimtune plan` traces)."""

from __future__ import annotations

import torch

from slimtune.training.config import TrainConfig


def make_adamw(groups: list[dict], lr: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups``; with ``fused``, PyTorch's fused kernel where every parameter allows it (plain
    floating-point tensors on CPU or CUDA). The default (``foreach``) step forms temporaries as large as all
    parameters together (0.71 GB above the moments for 176M fp32 parameters, measured here); the fused kernel
    forms none and stepped 3× faster (0.11 vs 0.33 s). Sharded parameters (FSDP2 DTensors, DeepSpeed's
    partitions) keep the default.

    The fused kernel updates the parameters in place without bumping their version counters (PyTorch 2.13;
    the ``foreach`` step bumps them), and code that caches what it derives from a weight keys it on that counter
    (PST's masked weight): a post-step hook bumps the version of every parameter the step updated."""
    params = [p for g in groups for p in g["params"]]
    fusable = fused and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    if not fusable:
        return torch.optim.AdamW(groups, lr=lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    optimizer.register_step_post_hook(_bump_versions)
    return optimizer


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    stepped = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if stepped:
        torch.autograd.graph.increment_version(stepped)


def make_scheduler(optimizer, cfg: TrainConfig):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    fn = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    return fn(optimizer, cfg.warmup_steps, cfg.steps)
