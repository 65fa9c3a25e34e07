"""The three hand-written autograd Functions against an fp64 reference, run in fp32 and bf16.

- PST's masked linear (``_PSTLinearFn`` behind ``PSTLinear``): the plain straight-through form in fp64;
- SAT's kept-rows op (``_KnownRows`` behind ``mlp_forward(..., reuse=True)``): the dense MLP with the omitted
  channels zeroed, in fp64;
- the frozen-head cross-entropy: ``F.cross_entropy`` over the full logits, in fp64.

The low-precision run takes the same values as the reference (its inputs are the reference's rounded to the
dtype, and the reference is recomputed from those rounded values), so the error measured is the arithmetic's
alone. Tolerances are relative norm errors per dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.methods import make_config
from slimtune.methods.pst.layer import PSTLinear
from slimtune.methods.sat.layer import mlp_forward
from slimtune.models.loading import tiny_llama
from slimtune.modules.losses import IGNORE, frozen_head_cross_entropy, linear_cross_entropy

TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}  # measured: 3.1e-7, 4.4e-3, 5.2e-4
ERRORS: list = []  # (what, dtype, error) of every comparison, for inspection
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16", "fp16"])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of every backward node behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    return names


def assert_close(got, want, dtype, what):
    err = rel_err(got, want)
    ERRORS.append((what, str(dtype), err))
    assert got.dtype == dtype, f"{what}: computed in {got.dtype}, not {dtype}"
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e} in {dtype}"


@DTYPES
@pytest.mark.parametrize("prior", ["magnitude", "wanda"])
def test_pst_masked_linear(dtype, prior):
    torch.manual_seed(0)
    cfg = make_config("pst", weight_rank=4, score_rank=2, weight_beta=0.5, alpha_lowrank=0.7,
                      alpha_struct=1.3, score_prior=prior, init="kaiming")  # fmt: skip
    layer = PSTLinear(nn.Linear(48, 32, dtype=dtype), cfg).to(dtype)
    with torch.no_grad():
        for p in (layer.pst_V, layer.pst_B, layer.pst_R, layer.pst_C):
            p.normal_(std=0.1)
        if prior == "wanda":
            layer.pst_in_scale.uniform_(0.5, 2.0)
    layer.sparsity.fill_(0.5)
    ref = copy.deepcopy(layer).double()
    mask = layer.keep_mask()
    ref.keep_mask = lambda scores=None: mask  # the same mask: only the arithmetic differs
    x = torch.randn(3, 7, 48).to(dtype)
    gy = torch.randn(3, 7, 32).to(dtype)
    x_lo, x_64 = x.clone().requires_grad_(), x.double().requires_grad_()
    y = layer(x_lo)
    assert "PSTLinearFn" in type(y.grad_fn).__name__
    got = torch.autograd.grad((y * gy).sum(), [x_lo, *layer.pst_parameters()])
    want_y = F.linear(x_64, ref.masked_weight(), ref.base_layer.bias)
    want = torch.autograd.grad((want_y * gy.double()).sum(), [x_64, *ref.pst_parameters()])
    assert_close(y, want_y, dtype, "y")
    for name, g, w in zip(("x", "U", "V", "A", "B", "R", "C"), got, want, strict=True):
        assert_close(g, w, dtype, f"d{name}")


@DTYPES
def test_sat_kept_rows_op(dtype):
    torch.manual_seed(0)
    mlp = tiny_llama(hidden_size=32, intermediate_size=64, layers=1).model.layers[0].mlp.to(dtype)
    ref = copy.deepcopy(mlp).double()
    kept = torch.tensor([0, 3, 4, 9, 17, 20, 33, 40, 41, 63])
    x = torch.randn(2, 5, 32).to(dtype)
    x_lo, x_64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.no_grad():  # the dense pass that scored the channels
        known = (mlp.gate_proj(x), mlp.up_proj(x))
    y = mlp_forward(mlp, x_lo, kept, known, reuse=True)
    assert "_KnownRowsBackward" in graph_nodes(y), "the kept-rows Function is not on this path"
    keep = torch.zeros(64, dtype=torch.float64)
    keep[kept] = 1.0
    want_y = ref.down_proj(ref.act_fn(ref.gate_proj(x_64)) * ref.up_proj(x_64) * keep)
    gy = torch.randn_like(want_y)
    lo_params = [x_lo, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    got = torch.autograd.grad((y * gy.to(dtype)).sum(), lo_params)
    want = torch.autograd.grad(
        (want_y * gy).sum(), [x_64, ref.gate_proj.weight, ref.up_proj.weight, ref.down_proj.weight]
    )
    assert_close(y, want_y, dtype, "y")
    for name, g, w in zip(("x", "gate", "up", "down"), got, want, strict=True):
        assert_close(g, w, dtype, f"d{name}")
    omitted = torch.ones(64, dtype=torch.bool)
    omitted[kept] = False
    assert not got[1][omitted].any() and not got[2][omitted].any() and not got[3][:, omitted].any()


@DTYPES
def test_frozen_head_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 9, 32, generator=g).to(dtype)
    w = (torch.randn(300, 32, generator=g) / 4).to(dtype)
    labels = torch.randint(0, 300, (3, 9), generator=g)
    labels[0, :3] = IGNORE
    h_lo, h_64 = h.clone().requires_grad_(), h.double().requires_grad_()
    loss = frozen_head_cross_entropy(h_lo, w, labels, chunk=4)
    logits = h_64 @ w.double().t()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    loss.backward()
    want.backward()
    assert loss.dtype == torch.float32  # accumulated in fp32 at least, whatever the input dtype
    assert rel_err(loss, want) < TOL[dtype]
    assert_close(h_lo.grad, h_64.grad, dtype, "dh")


@DTYPES
@pytest.mark.parametrize("with_bias", [False, True])
def test_trainable_head_cross_entropy(dtype, with_bias):
    """The trainer's logit-free loss through a trainable head: loss, dh, dW and db against fp64."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 9, 32, generator=g).to(dtype)
    w = (torch.randn(300, 32, generator=g) / 4).to(dtype)
    b = (torch.randn(300, generator=g) / 4).to(dtype) if with_bias else None
    labels = torch.randint(0, 300, (3, 9), generator=g)
    labels[0, :3] = IGNORE
    lo = [t.clone().requires_grad_() for t in (h, w) + ((b,) if with_bias else ())]
    hi = [t.double().requires_grad_() for t in (h, w) + ((b,) if with_bias else ())]
    loss = linear_cross_entropy(lo[0], lo[1], labels, lo[2] if with_bias else None, chunk=4)
    logits = F.linear(hi[0], hi[1], hi[2] if with_bias else None)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    loss.backward()
    want.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) < TOL[dtype]
    for name, a, r in zip(("dh", "dW", "db"), lo, hi):
        assert_close(a.grad, r.grad, dtype, name)
