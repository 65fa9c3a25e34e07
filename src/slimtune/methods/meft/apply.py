"""Applying MEFT: a ``MEFTLayer`` (``layer.py``) beside every gated MLP, each with its host store (``store.py``).

The adapter is a forward hook on the MLP module plus a ``meft_adapter`` submodule holding the router, so the base
model's state-dict names are unchanged. With values at 0 the model starts exactly at the base model. After the
trainer's optimizer step (which updates the routers), the stores' lazy Adam updates the touched rows. Before the
first training forward, ``calibrate`` fixes the input scale (``method.input_norm``), saved with the adapter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from slimtune.core.errors import UserError
from slimtune.methods.base import Adapted, first_nonfinite_grad
from slimtune.methods.meft.config import MEFTConfig
from slimtune.methods.meft.layer import MEFTLayer, MEFTRun
from slimtune.methods.meft.store import LayerStore
from slimtune.methods.state import require_complete
from slimtune.modules.arch import layer_mlps


class MEFTAdapted(Adapted):
    """MEFT's state: the routers (in the model) and the host stores (keys, values, their Adam moments)."""

    cfg: MEFTConfig

    def compile_refusal(self) -> str | None:
        return (
            "it gathers the touched adapter rows with a data-dependent nonzero, which breaks the traced graph"
        )

    def __init__(self, model: nn.Module, cfg: MEFTConfig, stores: list[LayerStore], run: MEFTRun):
        super().__init__(model, cfg)
        self.stores, self.run = stores, run

    def merge(self) -> nn.Module:
        raise NotImplementedError(
            "MEFT cannot be merged: each token uses its own top-K rows of a host-resident adapter (a ReLU over "
            "its key activations), which no fixed dense weight reproduces"
        )

    def on_step_start(self, step: int) -> None:
        self.run.device_bytes, self.run.rows = 0, []
        for st in self.stores:
            st.zero_grad()

    def after_backward(self, step: int) -> None:
        """Under data parallelism, the host rows' gradients are averaged over the ranks (the stores are outside
        the model, so DDP does not see them); over gloo, a CPU process group beside a GPU run's NCCL one."""
        group = _host_group()
        for st in self.stores:
            st.all_reduce_rows(group)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The lazy Adam of the touched host rows, with the trainer's current lr, betas, eps and weight decay."""
        group = optimizer.param_groups[0]
        if not all(st.grads_finite() for st in self.stores):  # an overflow: skip, as AMP skips the step
            self.extra_state["skipped_steps"] = self.extra_state.get("skipped_steps", 0) + 1
            for st in self.stores:
                st.zero_grad()
            return
        for st in self.stores:
            st.adam_step(
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
                self.cfg.train_keys,
                self.cfg.dense_emulation,
            )

    def nonfinite_grad(self) -> str | None:
        """The model's trainable tensors, then only the touched rows of each host store (not the whole store)."""
        found = first_nonfinite_grad(Adapted.named_trainable_parameters(self))
        bad = (f"meft_store.{i}" for i, st in enumerate(self.stores) if not st.grads_finite())
        return found or next(bad, None)

    def on_step_end(self, step: int) -> None:
        if self.run.calibrated and not is_fake(self.run.input_scale):  # a plan's trace has no values
            self.extra_state["input_scale"] = round(float(self.run.input_scale), 4)
        rows = self.run.rows
        if rows:
            self.extra_state["rows_per_layer"] = round(sum(rows) / len(rows), 1)
            self.extra_state["beta"] = round(sum(rows) / len(rows) / self.cfg.k, 2)

    def named_trainable_parameters(self):
        yield from super().named_trainable_parameters()
        for i, st in enumerate(self.stores):
            if self.cfg.train_keys:
                yield f"meft_store.{i}.keys", st.keys
            yield f"meft_store.{i}.values", st.values

    def param_groups(self, weight_decay: float) -> list[dict]:
        router = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": router, "weight_decay": weight_decay}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {n: p.detach() for n, p in super().named_trainable_parameters()}
        out[INPUT_SCALE] = self.run.input_scale
        for i, st in enumerate(self.stores):
            out[f"meft_store.{i}.keys"] = st.keys.data
            out[f"meft_store.{i}.values"] = st.values.data
            for name, p in (("keys", st.keys), ("values", st.values)):
                out[f"meft_store.{i}.{name}.exp_avg"] = st.state[p]["exp_avg"]
                out[f"meft_store.{i}.{name}.exp_avg_sq"] = st.state[p]["exp_avg_sq"]
            out[f"meft_store.{i}.step"] = st.step
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        require_complete(self, state)
        state = dict(state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            self.run.input_scale = state.pop(INPUT_SCALE).detach().clone().float().cpu()
            self.run.calibrated = True
            for name, value in state.items():
                if not name.startswith("meft_store."):
                    params[name].copy_(value)
                    continue
                _, i, rest = name.split(".", 2)
                st = self.stores[int(i)]
                if rest == "step":
                    st.step.copy_(value)
                    continue
                which, _, moment = rest.partition(".")
                p = st.keys if which == "keys" else st.values
                (st.state[p][moment] if moment else p.data).copy_(value)

    def memory_report(self) -> dict[str, int]:
        out = super().memory_report()
        for st in self.stores:
            for k, v in st.nbytes().items():
                out[k] = out.get(k, 0) + v
        out["device_adapter"] = self.run.device_bytes + sum(
            p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad
        )
        return out


def apply_meft(model: nn.Module, cfg: MEFTConfig) -> MEFTAdapted:
    mlps = layer_mlps(model)
    if not mlps:
        raise UserError(
            f"method meft: {type(model).__name__} has no feed-forward block (`mlp`) in its decoder layers to extend"
        )
    d = model.config.hidden_size
    std = cfg.init_std or getattr(model.config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(0)
    pin = torch.cuda.is_available()
    for p in model.parameters():
        p.requires_grad_(False)
    run, stores = MEFTRun(cfg.input_norm), []
    adapted = MEFTAdapted(model, cfg, stores, run)
    for i, mlp in enumerate(mlps):
        store = LayerStore(cfg.r, d, std, gen, pin)
        stores.append(store)
        mlp.meft_adapter = MEFTLayer(i, d, cfg, store, run, adapted.traffic)
        mlp.register_forward_hook(lambda m, args, out: out + m.meft_adapter(args[0]))

    def pre_forward(module, args, kwargs):
        run.cache.clear()
        run.token_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not run.calibrated and module.training and torch.is_grad_enabled():
            calibrate(module, args, kwargs, run)

    model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    return adapted


INPUT_SCALE = "meft_input_scale"


def calibrate(model: nn.Module, args, kwargs, run: MEFTRun) -> None:
    """Before the first training forward: one forward without gradients that only measures the mean L2 norm of
    the MLP inputs (non-padding tokens, every layer; averaged over the ranks of a data-parallel job, so every
    replica gets the same factor), and c = ``input_norm`` / that mean from then on (saved with the adapter).
    The adapter adds nothing during the pass, so it measures the base model's MLP inputs."""
    run.norms = [torch.zeros((), dtype=torch.float64, device="cpu") for _ in range(2)]  # host statistics
    try:
        with torch.no_grad():  # `forward`, not the call: the model's hooks (this one, a memory tracker's) see
            model.forward(*args, **kwargs)  # one forward per step; its layers' hooks see a reused module
        stats = torch.stack(run.norms)
    finally:
        run.norms = None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, group=_host_group())
    run.input_scale = (run.input_norm / (stats[0] / stats[1].clamp_min(1))).float()
    run.calibrated = True


_HOST_GROUP: list = []


def _host_group():
    """A gloo process group for the host stores' CPU tensors (None: the default group, when it is gloo or when
    there is no process group); created once, collectively, on the first step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]
