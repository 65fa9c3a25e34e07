"""Neuron selection on the host: per-token top-K (brute force or Key-Experts), the batch union and its cap.

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
    for e in probe.unique().tolist():
        rows, slots = (probe == e).nonzero(as_tuple=True)
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
