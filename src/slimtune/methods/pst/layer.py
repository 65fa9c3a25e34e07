"""PSTLinear: a frozen linear with a LoRA-style update and a learned top-k mask (Li et al., IJCAI 2022).

For a frozen W0 ∈ R^{n×k} (n = out, k = in) and bias b:

    W = W0 + β U V                           U: n×r_w, V: r_w×k  (V = 0 at init)
    S = |W| + α1 A B + α2 (R 1ᵀ + 1 Cᵀ)      A: n×r_m, B: r_m×k  (B = 0), R: n, C: k  (R = C = 0)
    M = top-k mask of S: the p = floor(n·k·s + 1e-9) lowest scores are 0 (unstructured), or
        the N highest of every M consecutive inputs kept (N:M, e.g. 2:4)
    y = x (M ⊙ W)ᵀ + b

The binarizer's backward is the identity (straight-through): ∂L/∂S := ∂L/∂M = G ⊙ W, with G = ∂L/∂(M ⊙ W), so
∂L/∂A = α1 (G⊙W) Bᵀ, ∂L/∂B = α1 Aᵀ (G⊙W), ∂L/∂R = α2 Σ_j (G⊙W)_ij, ∂L/∂C = α2 Σ_i (G⊙W)_ij; W (hence U, V)
receives M ⊙ G plus, through |W| in S, sign(W) ⊙ G ⊙ W (``score_grad_to_weight``). In autograd
form it reads ``M = mask + (S - S.detach())``: exactly the 0/1 mask in value, identity in gradient. No trainable n×k tensor
exists: only U, V, A, B, R, C are parameters.

The mask is found with ``kthvalue`` on float32 scores under no_grad and cached while the layer's parameters are
unchanged (``Tensor._version`` and storage): once per optimizer step in training, once in eval; without autograd the
masked weight is cached as well. In training the gradients come from a hand-written backward that rebuilds W from
U and V, so no n×k tensor is kept per layer between forward and backward.

Options beyond the paper: ``score_prior: wanda`` scales |W| column-wise by the inputs' RMS (statistics kept as
buffers); ``scope: row`` ranks each output row on its own (same p per layer, spread evenly over rows);
``nm_schedule: gradual`` keeps every mask of the ramp inside the N:M pattern (``nm_topk_mask``). Ties at the threshold are
broken by position (lower flat index pruned first), so exactly p entries are pruned, deterministically.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def n_pruned(numel: int, sparsity: float) -> int:
    """The one rounding rule: p = floor(N·s + 1e-9)."""
    return math.floor(numel * sparsity + 1e-9)


@torch.no_grad()
def topk_mask(scores: torch.Tensor, sparsity: float, p: int | None = None) -> torch.Tensor:
    """Boolean keep-mask with exactly ``n_pruned(N, sparsity)`` (or ``p``) False entries: the lowest scores, ties
    by index."""
    flat = scores.detach().float().flatten()
    p = n_pruned(flat.numel(), sparsity) if p is None else p
    keep = torch.ones_like(flat, dtype=torch.bool)
    if p == 0:
        return keep.view_as(scores)
    thr = flat.kthvalue(p).values
    keep &= flat > thr
    ties = (flat == thr).nonzero().flatten()
    still = p - int((flat < thr).sum())  # how many of the tied entries must go
    keep[ties[still:]] = True
    return keep.view_as(scores)


@torch.no_grad()
def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask pruning exactly ``n_pruned(N, sparsity)`` entries, spread evenly over the output rows
    (Wanda's per-output comparison group): floor(k·s) lowest of every row (ties by column), then the remaining
    p − n·floor(k·s) (< n) entries are each row's lowest kept one, lowest first (ties by row). Row thresholds come
    from ``kthvalue``, so this costs about what the per-layer mask does."""
    s = scores.detach().float()
    rows, cols = s.shape
    p = n_pruned(s.numel(), sparsity)
    per = min(n_pruned(cols, sparsity), p // rows)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=s.device)
    if per:
        thr = s.kthvalue(per, dim=-1, keepdim=True).values
        tied = s == thr
        # how many of each row's tied entries go, lowest column first
        need = per - (s < thr).sum(-1, keepdim=True)
        keep = ~((s < thr) | (tied & (tied.cumsum(-1) <= need)))
    extra = p - rows * per
    if extra:
        low, col = s.masked_fill(~keep, float("inf")).min(dim=-1)  # first minimal column of each row
        give = ~topk_mask(low, 0.0, p=extra)
        keep[give, col[give]] = False
    return keep


@torch.no_grad()
def nm_topk_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask pruning exactly ``n_pruned(N, sparsity)`` entries, the lowest scores among the m − n
    lowest of every m consecutive inputs (ties by position): at sparsity (m − n)/m it is the N:M mask, and below
    it the pruning only ever moves towards that pattern (``nm_schedule: gradual``)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.detach().float().view(rows, cols // m, m)
    low, order = torch.sort(groups, dim=-1, stable=True)
    cand, cand_pos = low[..., : m - n], order[..., : m - n]  # the only entries an N:M mask may prune
    p = min(n_pruned(scores.numel(), sparsity), cand.numel())
    # ties: a group's lowest before any group's second lowest, then by position (rank-major order)
    by_rank = cand.permute(2, 0, 1).reshape(-1)
    pruned = ~topk_mask(by_rank, 0.0, p=p).view(m - n, rows, cols // m).permute(1, 2, 0)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, cand_pos, ~pruned)
    return keep.view(rows, cols)


@torch.no_grad()
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask keeping the n highest of every m consecutive entries along the last (input) dim."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.detach().float().view(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.view(rows, cols)


class _PSTLinearFn(torch.autograd.Function):
    """y = x (M ⊙ W)ᵀ + b with the straight-through gradients above, written out so that backward rebuilds
    W = W0 + βUV from the parameters instead of autograd keeping W, S and M ⊙ W (three n×k tensors) per layer, and
    so that forward needs no S while the mask is cached. The closed forms of the module docstring, with
    G = ∂L/∂(M ⊙ W) = gyᵀ x and, under ``score_prior: wanda``, |W| scaled by the input RMS in S (so the weight's
    score gradient is sign(W)·scale ⊙ G ⊙ W)."""

    @staticmethod
    def forward(ctx, x, U, V, A, B, R, C, layer):
        w = layer.effective_weight()
        mask = layer.keep_mask()
        ctx.layer = layer
        # the parameters too (no copies): autograd then refuses a backward after they were changed in place
        ctx.save_for_backward(x, mask, U, V, A, B)
        return F.linear(x, w * mask.to(w.dtype), layer.base_layer.bias)

    @staticmethod
    def backward(ctx, gy):
        x, mask, U, V, A, B = ctx.saved_tensors
        layer = ctx.layer
        w = layer.effective_weight()  # from the U, V just unpacked (version-checked); no graph in backward
        m = mask.to(w.dtype)
        gx = gy @ (w * m) if ctx.needs_input_grad[0] else None
        g = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)  # n×k
        dt = torch.promote_types(w.dtype, torch.float32)
        gs = (g * w).to(dt)  # straight through: ∂L/∂S = ∂L/∂M
        da = (layer.alpha1 * gs @ B.to(dt).t()).to(A.dtype)
        db = (layer.alpha1 * A.to(dt).t() @ gs).to(B.dtype)
        dr = (layer.alpha2 * gs.sum(1)).to(layer.pst_R.dtype)
        dc = (layer.alpha2 * gs.sum(0)).to(layer.pst_C.dtype)
        dw = g * m
        if layer.score_grad_to_weight:  # through |W| (times the prior's scale) in S
            prior = torch.sign(w).to(dt)
            if layer.prior == "wanda":
                prior = prior * layer.pst_in_scale.to(dt)[None, :]
            dw = dw + (prior * gs).to(w.dtype)
        du = (layer.beta * dw @ V.t()).to(U.dtype)
        dv = (layer.beta * U.t() @ dw).to(V.dtype)
        return gx, du, dv, da, db, dr, dc, None


class PSTLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``, not copied) with PST's six small parameters."""

    def __init__(self, base: nn.Linear, cfg):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"PST wraps torch.nn.Linear layers, not {type(base).__name__}")
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        n, k = base.out_features, base.in_features
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.pst_U = nn.Parameter(torch.empty(n, cfg.weight_rank, **kw))
        self.pst_V = nn.Parameter(torch.zeros(cfg.weight_rank, k, **kw))
        self.pst_A = nn.Parameter(torch.empty(n, cfg.score_rank, **kw))
        self.pst_B = nn.Parameter(torch.zeros(cfg.score_rank, k, **kw))
        self.pst_R = nn.Parameter(torch.zeros(n, **kw))
        self.pst_C = nn.Parameter(torch.zeros(k, **kw))
        if not base.weight.is_meta:
            for p in (self.pst_U, self.pst_A):
                if cfg.init == "kaiming":
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                else:
                    nn.init.normal_(p)
        self.beta, self.alpha1, self.alpha2 = cfg.weight_beta, cfg.alpha_lowrank, cfg.alpha_struct
        self.score_grad_to_weight = cfg.score_grad_to_weight
        self.register_buffer("sparsity", torch.zeros(()))  # current s_t (checkpointed with the module)
        self.prior = cfg.score_prior
        if self.prior == "wanda":
            # input statistics: Σ x_j² and the token count, and the scale the score uses
            fkw = {"device": base.weight.device, "dtype": torch.float32}
            self.register_buffer("pst_in_sq", torch.zeros(k, **fkw))
            self.register_buffer("pst_in_count", torch.zeros((), **fkw))
            self.register_buffer("pst_in_scale", torch.ones(k, **fkw))
        self.row_scope = cfg.scope == "row"
        self.nm: tuple[int, int] | None = None  # set by the schedule during cool-down when the pattern is N:M
        self.nm_ramp: tuple[int, int] | None = None  # nm_schedule gradual: N:M-constrained pruning before it
        self.teacher: str | None = None  # distillation: "base" → W0, "dense" → W0 + βUV, both unmasked
        self.freeze_mask = False  # mask_update_interval > 1: reuse the cached mask between refreshes
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None  # M ⊙ W for forwards without autograd

    def extra_repr(self) -> str:
        n, k = self.base_layer.out_features, self.base_layer.in_features
        return f"in={k}, out={n}, r_w={self.pst_U.shape[1]}, r_m={self.pst_A.shape[1]}, nm={self.nm}"

    def pst_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.pst_U, self.pst_V, self.pst_A, self.pst_B, self.pst_R, self.pst_C)

    def effective_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.beta * (self.pst_U @ self.pst_V)

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight if self.score_grad_to_weight else weight.detach()
        dt = torch.promote_types(w.dtype, torch.float32)  # float32 at least (bf16/fp16 scores tie too often)
        struct = self.pst_R[:, None] + self.pst_C[None, :]
        prior = w.abs().to(dt)
        if self.prior == "wanda":
            prior = prior * self.pst_in_scale.to(dt)[None, :]
        return prior + self.alpha1 * (self.pst_A @ self.pst_B).to(dt) + self.alpha2 * struct.to(dt)

    def _state_key(self) -> tuple:
        return (
            float(self.sparsity),
            self.nm,
            # versions count in-place updates; storage addresses change when the module moves (`.to()`)
            *((p._version, p.data_ptr()) for p in (self.base_layer.weight, *self.pst_parameters())),
            self.pst_in_scale._version if self.prior == "wanda" else 0,
        )

    def keep_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The boolean keep-mask at the current sparsity/pattern (cached while nothing changed)."""
        key = self._state_key()
        if self._cache is not None and (
            self._cache[0] == key or (self.freeze_mask and self._cache[0][:2] == key[:2])
        ):
            return self._cache[1]
        if scores is None:
            with torch.no_grad():
                scores = self.scores(self.effective_weight())
        if self.nm:
            mask = nm_mask(scores, *self.nm)
        elif self.nm_ramp:
            mask = nm_topk_mask(scores, float(self.sparsity), *self.nm_ramp)
        elif self.row_scope:
            mask = row_topk_mask(scores, float(self.sparsity))
        else:
            mask = topk_mask(scores, float(self.sparsity))
        self._cache = (key, mask)
        return mask

    def masked_weight(self) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # eval and generation: nothing needs the straight-through path, so M ⊙ (W0 + βUV) is built once per
            # parameter state instead of once per forward (per decoded token). Only in eval mode: a forward without
            # autograd in training mode (the trainer's loss check) would leave a copy of every weight behind
            if self.training:
                w = self.effective_weight()
                return w * self.keep_mask().to(w.dtype)
            key = self._state_key()
            if self._weight_cache is None or self._weight_cache[0] != key:
                self._weight_cache = None  # free the stale copy before building the new one
                w = self.effective_weight()
                self._weight_cache = (key, w * self.keep_mask().to(w.dtype))
            return self._weight_cache[1]
        # the plain autograd form, for a frozen base that was made trainable (extra_trainable) — the fused
        # function below gives U, V, A, B, R, C their gradients, not W0 or b
        w = self.effective_weight()
        s = self.scores(w)
        mask = self.keep_mask(s).to(s.dtype)
        m = mask + (s - s.detach())  # value: the 0/1 mask; gradient: straight through to the scores
        return (m.to(w.dtype)) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            w = self.base_layer.weight if self.teacher == "base" else self.effective_weight()
            return F.linear(x, w, self.base_layer.bias)
        if self.training and self.prior == "wanda":
            with torch.no_grad():
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                self.pst_in_sq += (flat * flat).sum(0)
                self.pst_in_count += flat.shape[0]
        base = self.base_layer
        if torch.is_grad_enabled():
            self._weight_cache = None  # training: the copy would be stale after the next optimizer step
            if not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad):
                return _PSTLinearFn.apply(x, *self.pst_parameters(), self)
        return F.linear(x, self.masked_weight(), base.bias)

    def train(self, mode: bool = True):
        if mode:  # the eval-mode copy of M ⊙ W (a whole weight per layer) is not kept through training
            self._weight_cache = None
        return super().train(mode)

    @torch.no_grad()
    def refresh_prior(self) -> None:
        """score_prior=wanda: scale_j = rms_j / mean(rms) from the input statistics so far (after a step)."""
        if self.prior != "wanda" or float(self.pst_in_count) == 0:
            return
        rms = (self.pst_in_sq / self.pst_in_count).sqrt()
        self.pst_in_scale.copy_(rms / rms.mean().clamp(min=1e-12))

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding M ⊙ (W0 + β U V) (a new module; the base is untouched)."""
        w = self.effective_weight()
        out = nn.Linear(
            w.shape[1], w.shape[0], bias=self.base_layer.bias is not None, device=w.device, dtype=w.dtype
        )
        out.weight.copy_(w * self.keep_mask().to(w.dtype))
        if self.base_layer.bias is not None:
            out.bias.copy_(self.base_layer.bias)
        return out
