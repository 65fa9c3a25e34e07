"""Trace one real training step of an adapted model on fake tensors (shapes only, no storage).

The model is built from its config under ``FakeTensorMode``, the method's own ``apply`` adapts it, and the same
sequence the :class:`~slimtune.training.trainer.Trainer` runs (method callbacks, forward, backward, optimizer step) runs
twice under PyTorch's ``MemTracker``, which files every tensor as a parameter, buffer, gradient, activation,
temporary or optimizer state. The second step is the one that counts: the optimizer state exists by then, as in
every step of a real run after the first. A 70B step traces on a laptop: nothing is allocated.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from slimtune.core.errors import UserError

aten = torch.ops.aten

ROLES = ("parameters", "buffers", "gradients", "activations", "temporaries", "optimizer")
_TRACKER_ROLE = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer",
}


class PlanTracker(MemTracker):
    """``MemTracker`` for fine-tuning: frozen parameters get no gradient hook (registering one fails on a tensor
    that does not require grad), and only the global peak is kept (the stock tracker refreshes every module's
    peak on every operation, which is quadratic in the number of modules: minutes for a LoRA-wrapped model)."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen:
            self._param_to_grad_hook_handles[p] = (None, None)  # "already hooked"
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            for p in frozen:
                self._param_to_grad_hook_handles.pop(p, None)

    def track_external(self, *external) -> None:
        """As the stock tracker, and every trainable parameter of a module given here gets its gradient hooks now
        (the stock tracker hooks a module's parameters when its forward runs: the chunked loss uses the LM head's
        weight without calling the head, so an untied head's gradient was counted as a temporary)."""
        super().track_external(*external)
        for obj in external:
            if isinstance(obj, nn.Module):
                self._track_module_params_and_buffers(obj, install_grad_hooks=True)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)

    def reset_peak(self) -> None:
        """Start the peak over from what is alive now (between steps)."""
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._curr_mem_snap.items()}
        self._peak_mem_snap = {dev: dict(snap) for dev, snap in self._curr_mem_snap.items()}

    def by_role(self, which: str = "peak") -> dict[str, int]:
        """Bytes by role at the peak (``which`` 'peak') or now ('current'), all devices together."""
        out = dict.fromkeys(ROLES, 0)
        for snap in self.get_tracker_snapshot(which).values():
            for key, value in snap.items():
                role = _TRACKER_ROLE.get(getattr(key, "value", str(key)))
                if role:
                    out[role] += value
        return out


class UnknownValues(TorchDispatchMode):
    """What fake tensors cannot answer, answered for planning.

    - A number read from a tensor (``.item()``, ``float(t)``) is 1 and a truth value True: on fake tensors they
      are unknown, and they steer control flow, not sizes. 1, not 0: step counts and bias corrections divide;
      True: checks such as ``if mask.any():`` guard work, and the plan must count the work.
    - An output whose shape depends on values (``nonzero``, ``unique``, ``masked_select``, boolean indexing)
      takes its upper bound (every element selected), so the plan errs towards more memory, never less.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        if func is aten.nonzero.default:
            return torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device=args[0].device)
        if func in (aten._unique2.default, aten.unique_consecutive.default):
            x = args[0]
            return (
                x.new_empty(x.numel()),
                x.new_empty(x.shape, dtype=torch.long),
                x.new_empty(x.numel(), dtype=torch.long),
            )
        if func is aten.masked_select.default:
            return args[0].new_empty(args[0].numel())
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            return func(args[0], _long_indices(args[1]))
        return func(*args, **kwargs)


def _long_indices(indices: list) -> list:
    """Boolean index masks as the upper-bound long indices (one per masked dimension)."""
    out = []
    for i in indices:
        if i is not None and i.dtype == torch.bool:
            out += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
        else:
            out.append(i)
    return out


@contextlib.contextmanager
def fake_moves():
    """``module.to(...)`` on fake parameters rebinds them instead of swapping. PyTorch swaps every fake parameter,
    even for a move that changes nothing, and the swap fails when the parameter is referenced elsewhere (peft
    moves each adapter to its base layer's device and dtype). Only used while tracing, before any optimizer holds
    the parameters."""
    original = nn.Module._apply

    def _apply(self, fn, recurse=True):
        for module in self.modules() if recurse else [self]:
            with torch.no_grad():
                for key, p in list(module._parameters.items()):
                    new = fn(p) if p is not None else None
                    if new is not None and new is not p:
                        module._parameters[key] = nn.Parameter(new, requires_grad=p.requires_grad)
                for key, b in list(module._buffers.items()):
                    new = fn(b) if b is not None else None
                    if new is not None and new is not b:
                        module._buffers[key] = new
        return self

    nn.Module._apply = _apply
    try:
        yield
    finally:
        nn.Module._apply = original


@dataclass
class Trace:
    """One method's traced step: bytes by role at the peak and once the gradients exist (after backward and
    the method's ``after_backward``, where `slimtune bench` reads its roles), what the weights hold, FLOPs."""

    method: str
    peak: dict[str, int]
    at_grads: dict[str, int]
    frozen_bytes: int
    trainable_bytes: int
    host_bytes: int
    flops: int
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.peak.values())


def _step(
    adapted, optimizer, loss, batch: dict, grad_accum: int, step: int, with_grads=lambda: None, in_bwd=False
) -> None:
    """The Trainer's step (``Trainer.train_step``) without its logging, clipping reads and data stream;
    ``in_bwd``: the parameters stepped inside backward (``train.optimizer_in_backward``), not here."""
    adapted.on_step_start(step)
    for _ in range(grad_accum):
        (loss(batch) / grad_accum).backward()
    adapted.after_backward(step)
    with_grads()
    if not in_bwd:
        optimizer.step()
    adapted.optimizer_step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    adapted.on_step_end(step + 1)


def trace_step(
    config,
    method_cfg,
    batch: int,
    seq_len: int,
    dtype: torch.dtype = torch.bfloat16,
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
    fake: bool = True,
    chunked_loss: bool = True,
    fsdp: int = 1,
    fused_adamw: bool = True,
    optimizer_in_backward: bool = False,
    spec=None,
) -> Trace:
    """Build ``config``'s model in ``dtype``, apply ``method_cfg`` and trace two steps: on fake tensors (the
    plan), or with ``fake=False`` on real ones (the same tracker and step, to check the plan on small models).
    ``fsdp`` N > 1: shard the model over N ranks with the trainer's FSDP2 code and trace rank 0 (on a fake
    process group when ``fake``, on the job's real one otherwise). ``fused_adamw``: the trainer's AdamW (False:
    PyTorch's default ``foreach`` step, which the trainer ran before 2026-12-05). ``optimizer_in_backward``: each
    parameter steps inside backward and its gradient is freed there (``train.optimizer_in_backward``).
    ``spec``: the method's spec where the caller checked it once for many traces (:func:`slimtune.methods.apply`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from slimtune.modules.quant.nf4 import dynamic_map_8bit

    dynamic_map_8bit()  # a cached constant table, built from real values before a fake mode starts
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # the mesh is built from real values, before a fake mode starts
        mesh = stack.enter_context(_mesh(fsdp, fake)) if fsdp > 1 else None
        # PST keys its mask cache on storage addresses; a fake tensor's is a placeholder, and that is fine here
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        if fake:
            for mode in (FakeTensorMode(allow_non_fake_inputs=True), UnknownValues(), fake_moves()):
                stack.enter_context(mode)
        opts = {
            "grad_checkpointing": grad_checkpointing,
            "chunked_loss": chunked_loss,
            "mesh": mesh,
            "spec": spec,
        }
        opts |= {"fused_adamw": fused_adamw, "optimizer_in_backward": optimizer_in_backward}
        trace = _trace(config, method_cfg, batch, seq_len, dtype, grad_accum, **opts)
    trace.seconds = time.perf_counter() - t0
    return trace


@contextlib.contextmanager
def _mesh(world: int, fake: bool):
    """A 1-D device mesh over ``world`` CPU ranks: on PyTorch's fake process group (its collectives do nothing;
    the planning process is rank 0 of ``world``; removed again on exit, so nothing after sees a job), or with
    ``fake`` False on the job's initialised group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not fake:
        if not dist.is_initialized() or dist.get_world_size() != world:
            raise UserError(f"plan: a real FSDP trace needs a job of {world} processes (torchrun)")
        yield init_device_mesh("cpu", (world,))
        return
    if dist.is_initialized():
        raise UserError("plan --fsdp: run it as one process (it simulates the ranks)")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _adapted(config, method_cfg, dtype, grad_checkpointing, mesh, spec=None):
    """The method applied to ``config``'s model (sharded over ``mesh``), and the bytes this rank holds by role."""
    from transformers import AutoModelForCausalLM

    from slimtune.methods import apply
    from slimtune.training.setup import enable_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapted = apply(model, method_cfg, spec)
    if grad_checkpointing:
        enable_checkpointing(adapted)
    held = adapted.memory_report()
    if mesh is not None:  # the trainer's FSDP2 sharding; the optimizer then holds the shards
        from slimtune.engines import fsdp as sharding

        sharding.shard(adapted.model, mesh=mesh)
        for p in adapted.model.parameters():  # this rank holds its shards of them
            part = p.numel() - sharding.local(p).numel()
            held["trainable" if p.requires_grad else "frozen_weights"] -= part * p.element_size()
    return adapted, held


def _trace(
    config,
    method_cfg,
    batch,
    seq_len,
    dtype,
    grad_accum,
    grad_checkpointing,
    chunked_loss,
    mesh=None,
    fused_adamw=True,
    optimizer_in_backward=False,
    spec=None,
) -> Trace:
    from slimtune.training.optim import make_adamw
    from slimtune.training.setup import loss_function

    adapted, held = _adapted(config, method_cfg, dtype, grad_checkpointing, mesh, spec)
    optimizer = make_adamw(adapted.param_groups(0.0), 1e-4, fused=fused_adamw and mesh is None)
    if optimizer_in_backward:
        from slimtune.training.in_backward import StepInBackward

        StepInBackward(optimizer, list(adapted.named_trainable_parameters()), check_finite=False)
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    adapted.total_steps = None  # schedules hold their first rung, as in `slimtune bench`
    adapted.model.train()
    loss = loss_function(adapted, adapted.model, chunked_loss)
    tracker = PlanTracker()
    tracker.track_external(adapted.model, optimizer)
    at_grads: dict[str, int] = {}
    with tracker:
        # FLOPs on the first step; memory on the second, apart: the counter's module hooks keep activations alive
        # that gradient checkpointing frees (a LoRA step traced under it held 4x the checkpointed activations)
        with FlopCounterMode(display=False) as flops:
            _step(adapted, optimizer, loss, data, grad_accum, 0, in_bwd=optimizer_in_backward)
        tracker.reset_mod_stats()
        tracker.reset_peak()
        _step(
            adapted,
            optimizer,
            loss,
            data,
            grad_accum,
            1,
            lambda: at_grads.update(tracker.by_role("current")),
            in_bwd=optimizer_in_backward,
        )
    return Trace(
        method_cfg.name,
        tracker.by_role("peak"),
        at_grads,
        held["frozen_weights"],
        held["trainable"],
        held.get("host_offloaded", 0),
        flops.get_total_flops(),
        0.0,
    )
