"""Losses shared by methods, and the trainer's logit-free training loss.

``linear_cross_entropy`` computes next-token cross-entropy through an LM head ``z = W h (+ b)`` without ever
holding the ``[tokens, vocab]`` logits. It gathers the positions that have a target (prompt tokens and padding
never reach the head, which the plain loss cannot skip) and hands them to PyTorch's own chunked
``F.linear_cross_entropy`` (``options=LinearCrossEntropyOptions(batch_chunk_size=...)``, PyTorch 2.13): it walks the rows in chunks,
forms each chunk's logits, loss and share of the closed-form gradients

    g_t = (1/n) (softmax(z_t) - onehot(y_t)),   ∂/∂h_t = Wᵀ g_t,   ∂/∂W = Σ_t g_t h_tᵀ,   ∂/∂b = Σ_t g_t

and keeps only the input gradient and (for a trainable head) the weight gradient for backward. Peak extra
memory is one chunk of logits instead of the logits, their fp32 log-softmax and their gradient (three
``[tokens, vocab]`` tensors: ~0.2 GB each for SmolLM2 at 4 × 256 tokens in fp32, ~0.6 GB each for a 152k
vocabulary). FLOPs are those of the plain head on the target positions only.

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
from torch.nn import LinearCrossEntropyOptions

IGNORE = -100
"""The label that marks a position as not a training target (PyTorch's and transformers' ``ignore_index``)."""

CHUNK_BYTES = 64 * 2**20
"""Logits per chunk, in fp32 bytes: 341 rows of SmolLM2's 49k vocabulary, 110 of Qwen's 152k. PyTorch's own
chunk heuristic (``chunking_method="auto"``) picks chunks so small on CPU in fp32 that the loss took 12 s instead
of 1.9 s for 1,024 rows of SmolLM2's head here (2 threads)."""


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about :data:`CHUNK_BYTES` (at least 64)."""
    return max(64, CHUNK_BYTES // (vocab * 4))


def _register_flops() -> None:
    """Teach ``FlopCounterMode`` the FLOPs of PyTorch's chunked linear cross-entropy op (it forms the logits and
    the gradients inside one custom op, which the counter does not see into): 2·N·V·d for the logits and as much
    again for each gradient it forms (input, weight). `slimtune bench` and `slimtune plan` count with it."""
    import torch.nn.modules.linear_cross_entropy  # noqa: F401  (defines the op)
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = torch.ops.torch_nn._linear_cross_entropy_batch_chunked
    if op in flop_registry:
        return

    @register_flop_formula(op)
    def _flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        n, d = input_shape
        grads = int(bool(args[-3])) + int(bool(args[-2]))  # compute_input_grad, compute_linear_weight_grad
        return 2 * n * weight_shape[0] * d * (1 + grads)


_register_flops()


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
    ``[N, d]`` rows against ``labels`` ``[N]``. ``chunk``: rows per chunk (default: :func:`chunk_rows`).

    Only the positions with a target are gathered and passed to PyTorch's chunked
    ``F.linear_cross_entropy`` (``LinearCrossEntropyOptions``), which forms the gradients in forward and hands
    them over in backward: backward runs once."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE) if shift else labels
    flat, tgt = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = (tgt != IGNORE).nonzero().squeeze(1)
    if rows.numel() == 0:
        return (
            flat.sum().to(torch.promote_types(flat.dtype, torch.float32)) * 0.0
        )  # no target: a zero loss whose gradients are zero
    options = LinearCrossEntropyOptions(
        batch_chunk_size=chunk or chunk_rows(weight.shape[0]), chunking_method=None
    )
    loss = F.linear_cross_entropy(
        flat.index_select(0, rows).to(weight.dtype),
        weight,
        tgt.index_select(0, rows),
        linear_bias=bias,
        ignore_index=IGNORE,
        options=options,
    )
    return loss.to(torch.promote_types(loss.dtype, torch.float32))  # fp32 at least, fp64 stays fp64


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
    the hidden state it returns. Works through wrappers (peft, accelerate, DDP): the swap is found by identity.
    ``extra``: keyword arguments every training forward gets (``use_cache=False``)."""

    def __init__(self, model: nn.Module, head: nn.Linear, extra: dict | None = None):
        self.model, self.head, self.extra = model, head, extra or {}
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
            hidden = self.model(**inputs, **self.extra).logits
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
