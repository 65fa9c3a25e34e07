"""What the trainer sets up on an adapted model before its first step: the accelerator, gradient checkpointing,
the checks of what trains, and the training loss (also what `slimtune plan` traces)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from slimtune.core.errors import UserError
from slimtune.methods.base import Adapted
from slimtune.modules import compiling
from slimtune.modules.losses import LogitFreeLoss
from slimtune.training import in_backward
from slimtune.training.config import TrainConfig

log = logging.getLogger(__name__)


def precision(mixed_precision: str) -> str:
    """``train.mixed_precision`` as the accelerator runs it: ``auto`` is bf16 on CUDA, none elsewhere."""
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mixed_precision


def make_accelerator(mixed_precision: str):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=precision(mixed_precision), cpu=not torch.cuda.is_available())


def enable_checkpointing(adapted: Adapted) -> None:
    """Gradient checkpointing of the adapted model's backbone (a clear error where the method has none)."""
    m = adapted.model
    if not hasattr(m, "gradient_checkpointing_enable"):
        raise UserError(
            f"train.grad_checkpointing: not supported by method '{adapted.cfg.name}' "
            f"({type(m).__name__} keeps no backbone activations to recompute)"
        )
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(m, "enable_input_require_grads"):
        m.enable_input_require_grads()


def check_trainable(adapted: Adapted) -> None:
    """Refuse a method with nothing to train, or one that would train fp16 tensors with AdamW."""
    if not adapted.trainable_parameters():
        raise ValueError(f"method '{adapted.cfg.name}' left no trainable parameters")
    half = [n for n, p in adapted.named_trainable_parameters() if p.dtype == torch.float16]
    if half:
        raise UserError(
            f"model.dtype: method '{adapted.cfg.name}' would train {len(half)} fp16 tensors (e.g. {half[0]}); "
            "AdamW's eps (1e-8) is 0 in fp16 and small squared gradients underflow, so the update is NaN: "
            "use model.dtype: bf16, or fp32 weights with train.mixed_precision: fp16 on a GPU"
        )


def apply_memory_settings(adapted: Adapted, cfg: TrainConfig) -> None:
    """``train.grad_checkpointing``, or ``train.memory: low`` (checkpointing wherever the method allows it)."""
    if cfg.grad_checkpointing:
        enable_checkpointing(adapted)
    elif cfg.memory == "low":
        try:
            enable_checkpointing(adapted)
        except UserError as err:  # low memory still takes the chunked loss
            log.info("train.memory: low: no gradient checkpointing (%s)", err)


def loss_function(adapted: Adapted, model: torch.nn.Module, chunked: bool) -> Callable[[dict], torch.Tensor]:
    """The training loss of one micro-batch: the logit-free loss through the method's :meth:`~Adapted.loss_head`
    when ``chunked`` and the head passes a numeric check on a few tokens, else the model's own ``.loss``.
    ``model`` is what the forward runs through (the accelerate-prepared model); the planner calls it too."""
    from torch._subclasses.fake_tensor import is_fake

    # an HF model keeps a KV cache of every layer in training too when its config says use_cache (only gradient
    # checkpointing turns it off): nothing reads it, and each layer's update would recompile a compiled layer
    extra = {"use_cache": False} if _builds_a_cache(adapted.model) else {}
    head = adapted.loss_head() if chunked else None
    if head is not None:
        fn = LogitFreeLoss(model, head, extra)
        ids = (torch.arange(3, 11, device=head.weight.device) % head.weight.shape[0])[None]
        why = None if is_fake(head.weight) else fn.mismatch(ids)
        if why is None:
            return fn
        log.warning("train.chunked_loss: the model's logits are not its head's output (%s); using them", why)
    return lambda batch: model(**batch, **extra).loss


def _builds_a_cache(model: torch.nn.Module) -> bool:
    """An HF model (or a peft model over one), whose forward takes ``use_cache``."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, PreTrainedModel) and hasattr(base.config, "use_cache")


def compile_decoder(adapted: Adapted, acc) -> None:
    """``train.compile``: the decoder layers' training forward compiled (one process only, for now)."""
    if acc.num_processes > 1:
        raise UserError(
            f"train.compile: not built for a {acc.num_processes}-process run yet (one process only); "
            "set train.compile: false"
        )
    why = adapted.compile_refusal()
    if why:
        raise UserError(f"train.compile: method '{adapted.cfg.name}': {why}; set train.compile: false")
    compiling.check_toolchain(acc.device)
    n = compiling.compile_layers(adapted.model, adapted.cfg.name)
    log.info("train.compile: %d decoder layers compile on the first step", n)


def step_in_backward(adapted: Adapted, acc, optimizer) -> in_backward.StepInBackward:
    """``train.optimizer_in_backward``: AdamW steps each parameter inside backward (in_backward.py)."""
    why = in_backward.refusal(adapted, acc.num_processes, getattr(acc, "scaler", None))
    if why:
        raise UserError(f"train.optimizer_in_backward: {why}; set train.optimizer_in_backward: false")
    raw = getattr(optimizer, "optimizer", optimizer)  # (inside accelerate's wrapper)
    return in_backward.StepInBackward(raw, list(adapted.named_trainable_parameters()))
