"""Figures a bench run reports beside its timings: this machine's matmul rate, which loss a run trained with,
and the bytes the loss term holds either way."""

from __future__ import annotations

import time

import torch


def matmul_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate at the current thread count: the best of ``repeats`` n×n×n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def loss_path(trainer) -> str:
    """Which loss the run trained with: the logit-free ``chunked`` one, or the ``model``'s own."""
    from slimtune.modules.losses import LogitFreeLoss

    return "chunked" if isinstance(trainer.loss, LogitFreeLoss) else "model"


def loss_term_bytes(adapted, model, batch: dict) -> dict[str, int] | None:
    """Bytes the training loss holds at its peak beyond its input (the final hidden state), both ways, on one
    batch: ``logits`` = the model's own path (the [tokens, vocab] logits, their fp32 log-softmax and gradient),
    ``chunked`` = the logit-free loss (one chunk). Measured with PyTorch's ``MemTracker`` over the loss's forward
    and its backward to the hidden state; the head is held frozen (a trained head's weight gradient is the same
    tensor either way and is counted under gradients). None where the method forms its loss itself (QST)."""
    import torch.nn.functional as F

    from slimtune.modules.losses import IGNORE, LogitFreeLoss, linear_cross_entropy
    from slimtune.plan.trace import PlanTracker

    head = adapted.loss_head()
    if head is None:
        return None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), LogitFreeLoss(model, head).hidden_out():
        hidden = model(**inputs).logits
    labels, weight = batch["labels"], head.weight.detach()

    def logits_loss(h):
        z = F.linear(h.to(weight.dtype), weight, head.bias)
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        return F.cross_entropy(z.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE)

    def chunked_loss(h):
        return linear_cross_entropy(h, weight, labels, head.bias)

    out = {}
    for name, fn in (("logits", logits_loss), ("chunked", chunked_loss)):
        h = hidden.detach().requires_grad_()
        tracker = PlanTracker()
        tracker.track_external(weight, h, labels)  # inputs: filed as "other", outside the roles summed
        with tracker:
            torch.autograd.grad(fn(h), h)
        out[name] = sum(tracker.by_role("peak").values())
    return out
