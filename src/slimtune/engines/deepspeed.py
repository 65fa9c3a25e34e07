"""DeepSpeed ZeRO under slimtune's trainer: ``deepspeed.initialize`` wraps the adapted model and its AdamW, and
the method's state is seen whole again to save it.

slimtune calls DeepSpeed itself rather than through accelerate's plugin: accelerate keeps a CPU job in its
``MULTI_CPU`` state and ignores the plugin there (and with the plugin alone it reports one process of a
two-process job), so one code path runs on CPUs (gloo, tested here) and GPUs (NCCL). accelerate still answers
the job's rank, device, reductions and barriers.

ZeRO-2 partitions AdamW's moments and the gradients of the trainable tensors over the ranks; ZeRO-3 also the
parameters. The engine takes one optimizer step per ``grad_accum`` micro-batches: DeepSpeed divides each
micro-batch's loss by it, clips to ``max_grad_norm`` and steps AdamW itself.

Checkpoints stay the single-process format: the main rank writes the trainable tensors (gathered under ZeRO-3)
and AdamW's moments assembled from the partitions (:func:`full_optimizer_state`), so a run saved under DeepSpeed
resumes in one process or under DDP/FSDP. Resuming *under* DeepSpeed is refused: DeepSpeed builds its optimizer
state from the tensors it partitions, after the checkpoint would be read (not built).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import torch
from torch import nn

from slimtune.engines.base import Engine

CONFIG_ENV = "SLIMTUNE_DEEPSPEED_CONFIG"
"""JSON merged over the config slimtune builds (DeepSpeed settings slimtune has no key for; not in the tested
matrix)."""


def ds_config(batch_size: int, grad_accum: int, max_grad_norm: float | None, stage: int, mixed: str) -> dict:
    """The DeepSpeed config of one slimtune job (every value explicit: no ``auto`` for accelerate to fill), with
    ``$SLIMTUNE_DEEPSPEED_CONFIG`` merged over it."""
    from slimtune.core.errors import UserError

    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the optimizer every other engine steps
        "bf16": {"enabled": mixed == "bf16"},
        "fp16": {"enabled": mixed == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    extra = os.environ.get(CONFIG_ENV)
    if extra:
        try:
            extra = json.loads(extra)
        except ValueError as err:
            raise UserError(f"{CONFIG_ENV}: not JSON ({err})") from None
        if not isinstance(extra, dict):
            raise UserError(f"{CONFIG_ENV}: a JSON object is needed, got {type(extra).__name__}")
        for key, value in extra.items():
            both = isinstance(value, dict) and isinstance(config.get(key), dict)
            config[key] = {**config[key], **value} if both else value
    return config


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """(engine, ZeRO optimizer) over ``model`` and ``optimizer`` in the job's existing process group."""
    import deepspeed

    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return engine, zero_optimizer


def full_parameters(engine, stage: int):
    """A context in which every parameter is whole on every rank (ZeRO-3 gathers them; every rank must enter)."""
    if stage < 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def full_optimizer_state(groups: list[list[nn.Parameter]], hyper: list[dict], zero_optimizer) -> dict:
    """AdamW's ``state_dict()`` as one process would hold it, assembled from the ZeRO partitions (a collective):
    ``groups`` the trainable tensors of each parameter group in the order the AdamW was built with, ``hyper`` its
    groups' settings."""
    step = _step(zero_optimizer)
    moments = _zero2_moments(zero_optimizer) if hasattr(zero_optimizer, "bit16_groups") else None
    state, index, out_groups = {}, 0, []
    for params, settings in zip(groups, hyper):
        ids = []
        for p in params:
            found = moments.get(id(p)) if moments is not None else _zero3_moments(p)
            if found:
                state[index] = {"step": step.clone(), **found}
            ids.append(index)
            index += 1
        out_groups.append({**settings, "params": ids})
    return {"state": state, "param_groups": out_groups}


def _zero2_moments(zero_optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """ZeRO-2: every rank holds an equal slice of each group's flat fp32 AdamW state, in the order of the group's
    tensors (padding at the end); all-gathered here and cut back into the tensors' shapes, keyed by ``id``.
    (DeepSpeed's ``safe_get_full_optimizer_state`` fails here on a tensor whose slice lies on another rank.)"""
    import torch.distributed as dist

    out: dict[int, dict[str, torch.Tensor]] = {}
    for i, params in enumerate(zero_optimizer.bit16_groups):
        flat = zero_optimizer.single_partition_of_fp32_groups[i]
        state = zero_optimizer.optimizer.state[flat]
        group = zero_optimizer.real_dp_process_group[i]
        for key in ("exp_avg", "exp_avg_sq"):
            parts = [torch.empty_like(state[key]) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, state[key].contiguous(), group=group)
            whole, offset = torch.cat(parts).cpu(), 0
            for p in params:
                out.setdefault(id(p), {})[key] = whole[offset : offset + p.numel()].view(p.shape).clone()
                offset += p.numel()
    return out


def _zero3_moments(p: nn.Parameter) -> dict[str, torch.Tensor] | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    found = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
    return (
        {k: v.detach().cpu() for k, v in found.items()}
        if all(v is not None for v in found.values())
        else None
    )


def _step(zero_optimizer) -> torch.Tensor:
    """The optimizer steps taken, as AdamW counts them (the same for every tensor)."""
    base = getattr(zero_optimizer, "optimizer", zero_optimizer)
    for s in base.state.values():
        if "step" in s:
            return torch.as_tensor(s["step"], dtype=torch.float32).detach().cpu()
    return torch.tensor(0.0)


class DeepSpeedEngine(Engine):
    """ZeRO-2/3 (:func:`wrap`): DeepSpeed divides each micro-batch's loss by ``grad_accum``, reduces at the last
    one, clips and steps AdamW itself; a step cannot be skipped (ZeRO holds its reduced gradients until it
    steps), and under ZeRO-3 the head's weight is whole only inside the model's forward."""

    fused_adamw = False
    skip_refusal = "under deepspeed a step is not skipped: ZeRO holds its reduced gradients until it steps"

    def __init__(self, acc, grad_accum: int, max_grad_norm: float | None, stage: int, batch_size: int):
        super().__init__(acc, grad_accum, max_grad_norm)
        self.stage, self.batch_size = stage, batch_size
        self.name = f"deepspeed ZeRO-{stage}"
        self.loss_outside_forward = stage < 3

    def place_model(self, model: nn.Module) -> nn.Module:
        return model  # (deepspeed.initialize places it with its optimizer)

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        # the order of AdamW's tensors and its settings, to save its state as one process would
        self.groups = [list(g["params"]) for g in optimizer.param_groups]
        self.hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        config = ds_config(
            self.batch_size, self.grad_accum, self.max_grad_norm, self.stage, self.acc.mixed_precision
        )
        return wrap(model, optimizer, config)

    def accumulating(self, model: nn.Module, last: bool):
        model.set_gradient_accumulation_boundary(last)
        return super().accumulating(model, last)

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss)

    def step(self, model: nn.Module, optimizer, params: list[nn.Parameter]) -> float | None:
        model.step()  # clipping, AdamW and zeroing the gradients, in the engine
        norm = model.get_global_grad_norm() if self.max_grad_norm is not None else None
        return None if norm is None else float(norm)

    def whole_model(self, model: nn.Module):
        return full_parameters(model, self.stage)

    def optimizer_state(self, optimizer) -> dict:
        return full_optimizer_state(self.groups, self.hyper, optimizer)
