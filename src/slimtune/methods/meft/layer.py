"""MEFT's layer: a host-resident sparse parallel adapter added to an FFN's output, and the neuron selection.

Per layer and micro-batch (training and eval alike):
1. the FFN input x (non-padding tokens) goes to the host (D2H: T·d elements, plus the router logits);
2. the host selects each token's top-K neurons (``select_topk`` below) and their union S (optionally capped);
3. keys[S], values[S] are copied to the compute device as fresh leaf tensors (H2D: 2·|S|·d·4 bytes);
4. out = FFN(x) + ReLU(a) ⊙ M · values[S], with a = (c·x keys[S]ᵀ) (⊙ router gate of c·x) and M each token's own
   selections (``semantics: mask``) or all of S (``union``); c is one factor for the model, ``input_norm`` / the
   mean MLP-input norm of the first training batch (1 with ``input_norm: 0``);
5. in backward, hooks on the two leaves index-add their gradients into the host buffers (D2H: 2·|S|·d·4 bytes);
6. after the trainer's optimizer step (which updates the router), the store's lazy Adam updates the touched rows.

The adapter is a forward hook on the MLP module plus a ``meft_adapter`` submodule holding the router, so the base
model's state-dict names are unchanged. With values at 0 the model starts exactly at the base model.

Neuron selection, on the host: per-token top-K (brute force or Key-Experts), the batch union and its cap.

Brute force: a_t = x_t Kᵀ (r dot products per token), I_t = TopK(a_t, K).
Key-Experts: the r keys are N contiguous blocks of n_k = r/N; router logits g_t = W_g x_t (no softmax); the n_p
highest-logit experts are probed; candidate j of a probed expert e scores a_{t,j} = g_{t,e} · (k_j · x_t);
I_t = TopK over the n_p·n_k candidates only (N + n_p·n_k dot products per token instead of r).
Union S = ∪_t {j ∈ I_t : a_{t,j} > 0} (a non-positive activation is 0 after ReLU and would only cost transfer);
a cap keeps the rows with the largest Σ_t ReLU(a_{t,j}) (ties: lower index), never simply the lowest indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtune.methods.meft.config import MEFTConfig
from slimtune.methods.meft.store import LayerStore


@dataclass
class Selection:
    idx: torch.Tensor  # [T, K] neuron index per token (host)
    act: torch.Tensor  # [T, K] its pre-ReLU activation (host, fp32)
    probe: torch.Tensor | None  # [T, n_p] probed experts, or None (brute force)
    dots_per_token: int  # key dot products the search computed per token


@torch.no_grad()
def select_topk(
    x: torch.Tensor, keys: torch.Tensor, k: int, logits: torch.Tensor | None = None, n_probe: int = 0
) -> Selection:
    """Per-token top-K of ``x`` [T, d] against ``keys`` [r, d]; with router ``logits`` [T, N], Key-Experts."""
    if logits is None:
        scores = x @ keys.t()
        act, idx = scores.topk(k, dim=1)
        return Selection(idx, act, None, keys.shape[0])
    t, n = logits.shape
    nk = keys.shape[0] // n
    probe = logits.topk(n_probe, dim=1).indices  # [T, n_p]
    cand = torch.full((t, n_probe, nk), float("-inf"), dtype=x.dtype, device=x.device)
    blocks = keys.view(n, nk, -1)
    for e in range(n):  # every expert (a batch probes nearly all of them; a fixed loop is also traceable)
        rows, slots = (probe == e).nonzero(as_tuple=True)
        if not rows.numel():
            continue
        cand[rows, slots] = (x[rows] @ blocks[e].t()) * logits[rows, e, None]
    act, flat = cand.view(t, -1).topk(k, dim=1)
    idx = probe.gather(1, flat // nk) * nk + flat % nk
    return Selection(idx, act, probe, n + n_probe * nk)


@torch.no_grad()
def union_rows(sel: Selection, r: int, cap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S sorted, keep [T, K] bool): the rows to gather and which per-token selections survive."""
    positive = sel.act > 0
    agg = torch.zeros(r, dtype=torch.float32).index_add_(0, sel.idx[positive], sel.act[positive].float())
    rows = torch.zeros(r, dtype=torch.bool)
    rows[sel.idx[positive]] = True
    s = rows.nonzero().flatten()
    if cap and s.numel() > cap:
        order = torch.sort(agg[s], descending=True, stable=True).indices[:cap]
        s = s[order].sort().values
        rows.zero_()
        rows[s] = True
    keep = positive & rows[sel.idx]
    return s, keep


class MEFTRun:
    """State shared by the layers: the micro-batch's token mask, per-layer gathered slices (cached so a
    checkpointed recomputation uses the same rows), per-step statistics, and the input scale (``input_norm``)."""

    def __init__(self, input_norm: float = 0.0):
        self.input_norm = input_norm
        self.input_scale = torch.ones((), device="cpu")  # the adapter computes on c·x (c: see ``calibrate``)
        self.calibrated = not input_norm  # without a target norm there is nothing to measure
        self.norms: list[torch.Tensor] | None = None  # [sum of token norms, tokens] while calibrating
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
        if self.run.norms is not None:  # the calibration pass: measure the input, add nothing
            self.run.norms[0] += xf.detach()[valid].float().norm(dim=-1).sum().cpu()
            self.run.norms[1] += valid.sum().cpu()
            return torch.zeros_like(x)
        c = self.run.input_scale.to(x.device)
        # the router keeps its own (fp32) dtype whatever the model's; its logits gate in the model's dtype
        logits = self.router(xf.to(self.router.weight.dtype)) if self.router is not None else None
        cached = self.run.cache.get(self.index) if self.training else None
        if cached is None:
            cached = self._gather(xf, logits, valid)
            if self.training:
                self.run.cache[self.index] = cached
        s, ks, vs, sel_rows, cols, rows, probe = cached
        dev = x.device
        a = (
            xf @ ks.to(xf.dtype).t()
        ) * c  # [T, |S|]: (c·x) keys[S]ᵀ; the selection is the same for any c > 0
        if logits is not None:
            nk = self.cfg.r // self.cfg.experts
            gate = (logits[:, (s // nk).to(dev)] * c).to(a.dtype)  # the router's logits of c·x
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
