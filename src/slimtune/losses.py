"""Losses shared by methods.

``frozen_head_cross_entropy`` computes next-token cross-entropy through a *frozen* LM head without ever holding
the full ``[tokens, vocab]`` logits: for a model whose head receives no gradient (QST, PEMA), the gradient with
respect to the head's input is known in closed form during the forward pass,

    loss = (1/n) Σ_t [logsumexp(z_t) - z_t[y_t]],   z_t = W h_t          (W: [V, d], frozen)
    ∂loss/∂h_t = (1/n) Wᵀ (softmax(z_t) - onehot(y_t))                   (0 for ignored positions)

so the forward walks the tokens in chunks, computes each chunk's logits, its loss and its input gradient, and
keeps only the ``[tokens, d]`` gradient for backward (which just scales it by the incoming gradient). Peak extra
memory is one chunk of logits instead of all of them (4 × 256 tokens × 49,152 vocab in fp32 = 201 MB for SmolLM2,
plus as much again for their gradient). FLOPs are the same as the unfused head (one matmul forward, one backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
"""The label that marks a position as not a training target (PyTorch's and transformers' ``ignore_index``)."""


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        n_valid = (tgt != IGNORE).sum().clamp(min=1)
        grad = torch.zeros_like(flat) if hidden.requires_grad else None
        acc = torch.promote_types(flat.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        total = flat.new_zeros((), dtype=acc)
        for start in range(0, flat.shape[0], chunk):
            t = tgt[start : start + chunk]
            valid = t != IGNORE
            if not bool(valid.any()):
                continue
            h = flat[start : start + chunk]
            z = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(z, dim=-1)
            safe = t.clamp(min=0)
            picked = z.gather(1, safe[:, None]).squeeze(1)
            total = total + ((lse - picked) * valid).sum()
            if grad is not None:
                p = torch.softmax(z, dim=-1)
                p[torch.arange(len(t), device=t.device), safe] -= 1.0
                p *= valid[:, None].to(acc) / n_valid.to(acc)
                grad[start : start + chunk] = (p.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else flat.new_empty(0))
        ctx.shape = hidden.shape
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return None, None, None, None
        return (grad * grad_out).reshape(ctx.shape), None, None, None


def frozen_head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` shifted by one (HF convention:
    ``labels[:, t+1]`` is the target of position t; -100 is ignored). ``weight`` must not require grad."""
    if weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy: the head weight must be frozen (requires_grad=False)")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return _FrozenHeadCE.apply(hidden, weight, targets, chunk)


def frozen_head_rows_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of independent rows ``hidden`` [N, d] @ ``weight.T`` against ``targets`` [N] (no shift;
    -100 ignored), with the same logit-free forward/backward as :func:`frozen_head_cross_entropy`."""
    if weight.requires_grad:
        raise ValueError(
            "frozen_head_rows_cross_entropy: the head weight must be frozen (requires_grad=False)"
        )
    return _FrozenHeadCE.apply(hidden, weight, targets, chunk)
