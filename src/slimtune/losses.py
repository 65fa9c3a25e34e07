"""Losses shared by methods, and the trainer's logit-free training loss.

``linear_cross_entropy`` computes next-token cross-entropy through an LM head ``z = W h (+ b)`` without ever
holding the ``[tokens, vocab]`` logits. The loss's gradients are known in closed form,

    loss = (1/n) Σ_t [logsumexp(z_t) - z_t[y_t]]                         (n: positions with a target)
    g_t  = (1/n) (softmax(z_t) - onehot(y_t))                            (0 for ignored positions)
    ∂loss/∂h_t = Wᵀ g_t,    ∂loss/∂W = Σ_t g_t h_tᵀ,    ∂loss/∂b = Σ_t g_t

so the forward walks the *target* positions in chunks, forms each chunk's logits, its loss and its share of the
three gradients, and keeps only the ``[tokens, d]`` input gradient and (for a trainable head) the ``[V, d]``
weight gradient for backward, which scales them by the incoming gradient in place. Positions without a target
(prompt tokens, padding) never reach the head at all, which the plain loss cannot skip. Peak extra memory is one
chunk of logits instead of the logits, their log-softmax and their gradient (three ``[tokens, vocab]`` tensors:
~0.2 GB each for SmolLM2 at 4 × 256 tokens in fp32, ~0.6 GB each for a 152k vocabulary). FLOPs are those of the
plain head (one matmul forward, two backward) on the target positions only.

The trainer uses it for every method whose model lets it (:class:`LogitFreeLoss`): the model runs with its head
swapped for a pass-through, so it returns its final hidden state (after any linear logit scaling the family
applies, which commutes with the head), and the loss is taken from there. QST and PEMA call the frozen-head forms
in their own forward. Evaluation and generation always compute logits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE = -100
"""The label that marks a position as not a training target (PyTorch's and transformers' ``ignore_index``)."""

CHUNK_BYTES = 32 * 2**20
"""Logits per chunk, in bytes of the accumulation dtype (fp32): 32 MiB is 170 rows of SmolLM2's 49k vocabulary."""


def chunk_rows(vocab: int, acc_bytes: int = 4) -> int:
    """Rows per chunk so one chunk of logits takes about :data:`CHUNK_BYTES` (at least 16)."""
    return max(16, CHUNK_BYTES // (vocab * acc_bytes))


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        rows = (tgt != IGNORE).nonzero().squeeze(1)  # the positions with a target; the rest have no loss
        n_valid = max(int(rows.numel()), 1)
        acc = torch.promote_types(weight.dtype, torch.float32)  # logits in fp32 at least (fp64 stays fp64)
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(flat) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = flat.new_zeros((), dtype=acc)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = flat.index_select(0, idx).to(weight.dtype)
            z = F.linear(h, weight, bias).to(acc)
            y = tgt.index_select(0, idx)
            lse = torch.logsumexp(z, dim=-1)
            total = total + (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' storage
            g[torch.arange(len(idx), device=g.device), y] -= 1.0
            g.div_(n_valid)
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h.index_copy_(0, idx, (g @ weight).to(grad_h.dtype))
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.shape = hidden.shape
        return total / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice; its gradients are formed in forward and handed over "
                "once (compute the loss again instead of retain_graph=True)"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # handed to autograd: nothing here outlives the backward
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.mul_(grad_out.to(g.dtype))  # in place: a loss scale (1 / grad_accum) costs no copy
        grad_h = grad_h.reshape(ctx.shape) if grad_h is not None else None
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (-100 ignored), equal in value
    and in every gradient (hidden, a trainable ``weight`` and ``bias``) to ``F.cross_entropy`` on the full logits.
    ``shift``: HF's causal convention, ``labels[:, t+1]`` is the target of position t; without it ``hidden`` is
    ``[N, d]`` rows against ``labels`` ``[N]``. ``chunk``: target rows per chunk (default: :func:`chunk_rows`).
    Backward runs once (the gradients are formed in forward and handed over)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE) if shift else labels
    return _LinearCE.apply(hidden, weight, bias, targets, chunk or chunk_rows(weight.shape[0]))


def frozen_head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """:func:`linear_cross_entropy` through a head that must be frozen (QST's and PEMA's forward use it and rely
    on no head gradient being formed)."""
    if weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy: the head weight must be frozen (requires_grad=False)")
    return linear_cross_entropy(hidden, weight, labels, chunk=chunk)


def frozen_head_rows_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of independent rows ``hidden`` [N, d] @ ``weight.T`` against ``targets`` [N] (no shift;
    -100 ignored), through a frozen head like :func:`frozen_head_cross_entropy`."""
    if weight.requires_grad:
        raise ValueError(
            "frozen_head_rows_cross_entropy: the head weight must be frozen (requires_grad=False)"
        )
    return linear_cross_entropy(hidden, weight, targets, chunk=chunk, shift=False)


class _HiddenOut(nn.Module):
    """Stands in for an LM head during a training forward: returns its input, the final hidden state."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class LogitFreeLoss:
    """The trainer's loss for a model whose output layer ``head`` (a plain ``nn.Linear``) it may apply itself:
    the model runs with ``head`` swapped for a pass-through and :func:`linear_cross_entropy` takes the loss from
    the hidden state it returns. Works through wrappers (peft, accelerate, DDP): the swap is found by identity."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        self.model, self.head = model, head
        owners = [(m, n) for m in model.modules() for n, c in m.named_children() if c is head]
        if len(owners) != 1:
            raise ValueError(f"the output layer is a child of {len(owners)} modules, not one")
        self._owner, self._name = owners[0]
        self._stand_in = _HiddenOut()

    @contextmanager
    def hidden_out(self):
        """Inside: the model's forward returns the final hidden state (scaled as its logits are) as ``logits``."""
        setattr(self._owner, self._name, self._stand_in)
        try:
            yield
        finally:
            setattr(self._owner, self._name, self.head)

    def __call__(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.hidden_out():
            hidden = self.model(**inputs).logits
        return linear_cross_entropy(hidden, self.head.weight, batch["labels"], self.head.bias)

    @torch.no_grad()
    def mismatch(self, input_ids: torch.Tensor) -> str | None:
        """None if the head applied to the pass-through output reproduces the model's logits on ``input_ids``
        (checked once before training: a family that transforms its logits non-linearly fails it), else what
        differs."""
        was = self.model.training
        self.model.eval()
        try:
            want = self.model(input_ids=input_ids).logits.float()
            with self.hidden_out():
                hidden = self.model(input_ids=input_ids).logits
            got = F.linear(hidden.to(self.head.weight.dtype), self.head.weight, self.head.bias).float()
        finally:
            self.model.train(was)
        err, scale = float((got - want).abs().max()), float(want.abs().max()) + 1e-6
        return None if err <= 1e-3 * scale else f"max |difference| {err:.3g} of {scale:.3g}"
