"""Applying MEFT: a host-resident sparse parallel adapter added to every FFN's output.

Per layer and micro-batch (training and eval alike):
1. the FFN input x (non-padding tokens) goes to the host (D2H: T·d elements, plus the router logits);
2. the host selects each token's top-K neurons (``select.py``) and their union S (optionally capped);
3. keys[S], values[S] are copied to the compute device as fresh leaf tensors (H2D: 2·|S|·d·4 bytes);
4. out = FFN(x) + ReLU(a) ⊙ M · values[S], with a = (x keys[S]ᵀ) (⊙ router gate) and M each token's own selections
   (``semantics: mask``) or all of S (``union``);
5. in backward, hooks on the two leaves index-add their gradients into the host buffers (D2H: 2·|S|·d·4 bytes);
6. after the trainer's optimizer step (which updates the router), the store's lazy Adam updates the touched rows.

The adapter is a forward hook on the MLP module plus a ``meft_adapter`` submodule holding the router, so the base
model's state-dict names are unchanged. With values at 0 the model starts exactly at the base model.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import UserError
from slimtune.methods.base import Adapted, TrainerHooks
from slimtune.methods.meft.config import MEFTConfig
from slimtune.methods.meft.select import select_topk, union_rows
from slimtune.methods.meft.store import LayerStore


class MEFTRun:
    """State shared by the layers: the micro-batch's token mask, per-layer gathered slices (cached so a
    checkpointed recomputation uses the same rows), and per-step statistics."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None
        self.cache: dict[int, tuple] = {}
        self.device_bytes = 0  # compute-device adapter bytes of the current step (slices + their gradients)
        self.rows: list[int] = []  # |S| per layer and micro-batch this step


class MEFTLayer(nn.Module):
    """The router of one layer (a registered parameter) plus a handle on its host store."""

    def __init__(self, index: int, d: int, cfg: MEFTConfig, store: LayerStore, run: MEFTRun, traffic):
        super().__init__()
        self.index, self.cfg, self.run, self.traffic = index, cfg, run, traffic
        self.store = [store]  # a list so nn.Module does not register (and move) the host tensors
        self.router = None
        if cfg.experts:
            self.router = nn.Linear(d, cfg.experts, bias=False)
            with torch.no_grad():  # row i = scale x mean of expert i's keys
                means = store.keys.data.view(cfg.experts, cfg.r // cfg.experts, d).mean(1)
                self.router.weight.copy_(cfg.router_scale * means)
            self.router.requires_grad_(cfg.train_keys)

    def _gather(self, x: torch.Tensor, logits: torch.Tensor | None, valid: torch.Tensor):
        store, cfg, label = self.store[0], self.cfg, f"layer{self.index}"
        xh = x.detach()[valid].to("cpu", torch.float32)
        self.traffic.add("d2h", label, xh.numel() * x.element_size())
        lh = None
        if logits is not None:
            lh = logits.detach()[valid].to("cpu", torch.float32)
            self.traffic.add("d2h", label, lh.numel() * logits.element_size())
        sel = select_topk(xh, store.keys.data, cfg.k, lh, cfg.n_probe)
        s, keep = union_rows(sel, cfg.r, cfg.cap)
        dev = x.device
        ks = store.keys.data[s].to(dev, non_blocking=True)
        vs = store.values.data[s].to(dev, non_blocking=True)
        self.traffic.add("h2d", label, (ks.numel() + vs.numel()) * 4)
        if torch.is_grad_enabled() and self.training:
            ks.requires_grad_(cfg.train_keys)
            vs.requires_grad_(True)
            for leaf, which in ((ks, "keys"), (vs, "values")):
                if leaf.requires_grad:
                    leaf.register_hook(self._grad_hook(which, s, label))
            self.run.device_bytes += 2 * (ks.numel() + vs.numel()) * 4
        # per-token selections as (row in the flat batch, column in S)
        rows = valid.nonzero().flatten()
        t_idx, k_idx = keep.nonzero(as_tuple=True)
        cols = torch.searchsorted(s, sel.idx[t_idx, k_idx])
        probe = sel.probe
        self.run.rows.append(int(s.numel()))
        return s, ks, vs, rows[t_idx.to(rows.device)], cols, rows, probe

    def _grad_hook(self, which: str, s: torch.Tensor, label: str):
        store = self.store[0]

        def hook(grad):
            store.add_grad(which, s, grad)
            self.traffic.add("d2h", label, grad.numel() * 4)

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        mask = self.run.token_mask
        valid = (
            mask.reshape(-1).bool().to(x.device) if mask is not None and mask.numel() == xf.shape[0] else None
        )
        if valid is None:
            valid = torch.ones(xf.shape[0], dtype=torch.bool, device=x.device)
        logits = self.router(xf) if self.router is not None else None
        cached = self.run.cache.get(self.index) if self.training else None
        if cached is None:
            cached = self._gather(xf, logits, valid)
            if self.training:
                self.run.cache[self.index] = cached
        s, ks, vs, sel_rows, cols, rows, probe = cached
        dev = x.device
        a = xf @ ks.to(xf.dtype).t()  # [T, |S|]
        if logits is not None:
            nk = self.cfg.r // self.cfg.experts
            gate = logits[:, (s // nk).to(dev)]
            if self.cfg.semantics == "union":  # unprobed experts contribute 0
                probed = torch.zeros(xf.shape[0], self.cfg.experts, dtype=torch.bool, device=dev)
                probed[rows.to(dev)[:, None], probe.to(dev)] = True
                gate = gate * probed[:, (s // nk).to(dev)]
            a = a * gate
        if self.cfg.semantics == "mask":
            m = torch.zeros_like(a, dtype=torch.bool)
            m[sel_rows.to(dev), cols.to(dev)] = True
        else:
            m = valid[:, None].expand_as(a)
        h = torch.relu(a) * m
        return (h @ vs.to(h.dtype)).reshape(shape)


class MEFTAdapted(Adapted):
    stores: list[LayerStore]
    run: MEFTRun

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
        for i, st in enumerate(self.stores):
            out[f"meft_store.{i}.keys"] = st.keys.data
            out[f"meft_store.{i}.values"] = st.values.data
            for name, p in (("keys", st.keys), ("values", st.values)):
                out[f"meft_store.{i}.{name}.exp_avg"] = st.state[p]["exp_avg"]
                out[f"meft_store.{i}.{name}.exp_avg_sq"] = st.state[p]["exp_avg_sq"]
            out[f"meft_store.{i}.step"] = st.step
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.require_complete(state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
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


def _mlps(model: nn.Module) -> list[nn.Module]:
    out = [
        m
        for _, m in model.named_modules()
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
    ]
    if not out:
        raise UserError(
            f"method meft: {type(model).__name__} has no Llama-style MLP (gate/up/down_proj) to extend"
        )
    return out


def apply_meft(model: nn.Module, cfg: MEFTConfig) -> Adapted:
    mlps = _mlps(model)
    d = model.config.hidden_size
    std = cfg.init_std or getattr(model.config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(0)
    pin = torch.cuda.is_available()
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = MEFTAdapted(model, cfg, TrainerHooks())
    run = MEFTRun()
    adapted.run, adapted.stores = run, []
    for i, mlp in enumerate(mlps):
        store = LayerStore(cfg.r, d, std, gen, pin)
        adapted.stores.append(store)
        mlp.meft_adapter = MEFTLayer(i, d, cfg, store, run, adapted.traffic)
        mlp.register_forward_hook(lambda m, args, out: out + m.meft_adapter(args[0]))

    def pre_forward(module, args, kwargs):
        run.cache.clear()
        run.token_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.register_forward_pre_hook(pre_forward, with_kwargs=True)

    def on_step_start(step, a):
        run.device_bytes, run.rows = 0, []
        for st in a.stores:
            st.zero_grad()

    def on_step_end(step, a):
        if run.rows:
            a.extra_state["rows_per_layer"] = round(sum(run.rows) / len(run.rows), 1)
            a.extra_state["beta"] = round(sum(run.rows) / len(run.rows) / cfg.k, 2)

    def optimizer_step(optimizer):
        group = optimizer.param_groups[0]
        if not all(st.grads_finite() for st in adapted.stores):  # an overflow: skip, as AMP skips the step
            adapted.extra_state["skipped_steps"] = adapted.extra_state.get("skipped_steps", 0) + 1
            for st in adapted.stores:
                st.zero_grad()
            return
        for st in adapted.stores:
            st.adam_step(
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
                cfg.train_keys,
                cfg.dense_emulation,
            )

    adapted.hooks.on_step_start = on_step_start
    adapted.hooks.on_step_end = on_step_end
    adapted.optimizer_step = optimizer_step
    return adapted
