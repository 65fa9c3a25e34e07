"""FSDP2: shard an adapted model over the ranks of a job with PyTorch's ``fully_shard``, and see it whole again to
save or load.

Every decoder layer (of the backbone, and of a side network that has one per backbone layer) is one FSDP unit,
the rest of the model the root unit. FSDP2 shards each parameter on its own (dim 0, a ``DTensor``), so frozen and
trainable tensors of one layer share a unit without either losing anything: frozen tensors get no gradient and no
optimizer state, only the trainable ones are reduce-scattered. The root unit is not resharded after the forward,
so the LM head the chunked loss applies after the forward is still whole there.

slimtune calls ``fully_shard`` itself rather than through accelerate's plugin: accelerate builds FSDP only for GPU
device types, and this way one code path runs on CPUs (gloo, tested here) and GPUs (NCCL).

Checkpoints stay the single-process format: :func:`full_parameters` gathers the sharded trainable tensors
(every rank takes part, the main rank writes) and :func:`full_optimizer_state` AdamW's moments; a checkpoint is
read into the whole model before it is sharded and :func:`shard_optimizer_state` cuts the moments to each rank's
part, so a run saved under FSDP resumes under any number of processes, or none.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.engines.base import Engine


def _dtensor():
    from torch.distributed.tensor import DTensor, distribute_tensor

    return DTensor, distribute_tensor


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units below the root: the entries of every module list as long as the
    model's decoder (its layers; a side network's layers), outermost first, no unit inside another."""
    n = getattr(model.config, "num_hidden_layers", None)
    units: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and id(m) not in inside:
            units.extend(m)
            inside.update(id(x) for u in m for x in u.modules())
    if not units:
        raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers to shard")
    return units


def shard(model: nn.Module, mixed_precision: str = "no", mesh=None) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (default: the default process group; one unit per decoder layer,
    the rest at the root). ``mixed_precision`` bf16: parameters are gathered and computed in bf16, gradients
    reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # the chunked loss does nothing in place on the root's outputs (equal to one process: test_distributed.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # bitsandbytes' 4-bit weights are uint8 Parameters whose quantization state a DTensor would drop: they stay
    # whole on every rank (as accelerate's FSDP2 preparation does); pure-torch NF4 keeps its codes in buffers
    kept = {p for p in model.parameters() if not p.requires_grad and not p.is_floating_point()}
    for unit in layer_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, ignored_params=kept)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=kept)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor; any other tensor itself."""
    DTensor, _ = _dtensor()
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded or partial tensor (a collective); any other tensor itself."""
    DTensor, _ = _dtensor()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _sharded_slots(model: nn.Module, trainable_only: bool) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    DTensor, _ = _dtensor()
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if isinstance(p, DTensor) and (p.requires_grad or not trainable_only):
                yield mod, name, p


@contextmanager
def full_parameters(model: nn.Module, trainable_only: bool = True):
    """Inside: every sharded trainable parameter of ``model`` (every one: ``trainable_only=False``) is a plain
    tensor holding the whole of it, so a method's ``state_dict``/``save``/``load_state_dict`` see its state as
    one process would (a method's state is its trainable tensors and buffers; buffers are not sharded). Read-only: what is
    written there does not reach the shards (a checkpoint is loaded before sharding). A collective: every rank
    enters. Costs one whole copy of those parameters per rank while inside. Outside a sharded model: nothing."""
    slots = list(_sharded_slots(model, trainable_only))
    if not slots:
        yield
        return
    whole: dict[int, nn.Parameter] = {}  # tied tensors (embedding = head) stay one tensor
    for mod, name, p in slots:
        if id(p) not in whole:
            whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
        mod._parameters[name] = whole[id(p)]
    try:
        yield
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective): the same
    layout one process saves."""
    DTensor, _ = _dtensor()
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a whole (single-process) state: cut each sharded parameter's
    moments to this rank's shard, as the optimizer keeps them under FSDP."""
    DTensor, distribute_tensor = _dtensor()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    optimizer.state[p][k] = distribute_tensor(  # every rank holds the whole: no messages
                        v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                    )


class FSDPEngine(Engine):
    """FSDP2 over the job's ranks: one unit per decoder layer (:func:`shard`); gradients reduce-scattered after
    the last micro-batch; AdamW over the shards (not fused); the method's state gathered whole to save."""

    name = "fsdp"
    fused_adamw = False

    def place_model(self, model: nn.Module) -> nn.Module:
        return shard(model, self.acc.mixed_precision)  # (each rank's shards move to its device)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        shard_optimizer_state(optimizer)

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer  # (accelerate's wrapper knows only models it prepared itself)

    def accumulating(self, model: nn.Module, last: bool):
        model.set_requires_gradient_sync(last)
        return super().accumulating(model, last)

    def clip(self, params: list[nn.Parameter]) -> float:
        # torch's clip takes sharded gradients (accelerate's knows only prepared models)
        return float(whole(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)))

    def whole_model(self, model: nn.Module):
        return full_parameters(model)

    def optimizer_state(self, optimizer) -> dict:
        return full_optimizer_state(optimizer)
