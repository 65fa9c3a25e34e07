"""The SiLU-gated MLP keeping two [tokens, intermediate] tensors for backward (slimtune/modules/activations.py): the same loss
and gradients as HF's forward, bit for bit; fewer saved bytes; applied only where the MLP is exactly that form."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import slimtune.methods as M
from slimtune.capabilities import probes as caps
from slimtune.modules import activations
from slimtune.modules.activations import fuse_gated_mlps
from slimtune.modules.arch import layer_mlps


def adapt(method, family="llama", fused=True, **kw):
    if fused:
        return caps.adapt(method, family, **kw)
    keep = M.keep_fewer_activations
    M.keep_fewer_activations = lambda model: 0
    try:
        return caps.adapt(method, family, **kw)
    finally:
        M.keep_fewer_activations = keep


def fused_count(model) -> int:
    return sum(
        getattr(vars(m).get("forward"), "__func__", None) is activations._forward for m in layer_mlps(model)
    )


def loss_and_grads(model, data):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "method,family,dtype",
    [
        ("full", "llama", torch.float32),
        ("full", "llama", torch.bfloat16),
        ("full", "qwen2", torch.float32),
        ("lora", "llama", torch.float32),
        ("lora", "mistral", torch.bfloat16),
        ("qlora", "llama", torch.float32),
        ("meft", "llama", torch.float32),
    ],
)
def test_same_loss_and_gradients_bit_for_bit(method, family, dtype):
    data = caps.batch()
    ours, theirs = adapt(method, family, dtype=dtype), adapt(method, family, fused=False, dtype=dtype)
    assert fused_count(ours.model) == len(layer_mlps(ours.model)) >= 2
    assert fused_count(theirs.model) == 0
    torch.manual_seed(0)
    loss, grads = loss_and_grads(ours.model, data)
    torch.manual_seed(0)
    ref_loss, ref_grads = loss_and_grads(theirs.model, data)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def saved_bytes(model, data) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward over one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**data)
    return sum(seen.values())


@pytest.mark.parametrize("method,kept", [("full", 2), ("lora", 1)])
def test_fewer_intermediate_tensors_are_kept(method, kept):
    """Full fine-tuning keeps 2 fewer [tokens, intermediate] tensors per layer (silu(gate) and the product), LoRA 1
    (silu(gate); down's LoRA A keeps the product as its input)."""
    data = caps.batch(b=2, t=16)
    ours, theirs = adapt(method, fused=False), adapt(method, fused=False)
    assert fuse_gated_mlps(ours.model) == ours.model.config.num_hidden_layers
    cfg = ours.model.config
    tokens = data["input_ids"].numel()
    per_tensor = tokens * cfg.intermediate_size * 4
    saved = saved_bytes(theirs.model, data) - saved_bytes(ours.model, data)
    assert saved == kept * per_tensor * cfg.num_hidden_layers


def test_backward_of_a_down_projection_with_bias():
    """A plain down projection with a bias (gradients of all four inputs against autograd's, fp64)."""
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 24), nn.Linear(8, 24)
            self.down_proj, self.act_fn = nn.Linear(24, 8), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp = MLP().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(mlp(x).square().sum(), [x, *mlp.parameters()])
    mlp.forward = fuse_one(mlp)
    ours = torch.autograd.grad(mlp(x).square().sum(), [x, *mlp.parameters()])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def fuse_one(mlp):
    assert activations._is_silu_gated(mlp) and activations._computes_the_same(mlp)
    return types.MethodType(activations._forward, mlp)


def test_left_alone_where_the_mlp_is_another_form():
    # Gemma's MLP is gated by GELU; SAT replaces the MLP's forward with its sliced one
    assert fused_count(adapt("full", "gemma2").model) == 0
    sat = adapt("sat", "llama")
    assert all("forward" in vars(m) for m in layer_mlps(sat.model)) and fused_count(sat.model) == 0

    class Doubled(nn.Module):  # the parts of a gated MLP, computing something else
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert activations._is_silu_gated(Doubled()) and not activations._computes_the_same(Doubled())


def test_without_gradients_the_mlp_computes_as_hfs():
    data = caps.batch()
    ours, theirs = adapt("full"), adapt("full", fused=False)
    with torch.no_grad():
        assert torch.equal(ours.model(**data).logits, theirs.model(**data).logits)


@pytest.mark.parametrize(
    "method,dtype,at_least",
    [("full", torch.float32, 4), ("lora", torch.float32, 0), ("lora", torch.bfloat16, 1)],
)
def test_checkpointed_norms_keep_only_their_input(method, dtype, at_least, monkeypatch):
    """The traced step's activations (slimtune plan's tracker) lose, per norm and element: the fp32 normalised
    input where the weight trains (full fine-tuning: 4 bytes), the fp32 copy of a bf16 input less the bf16 input the
    checkpoint keeps instead (LoRA in bf16: 1.5 bytes measured at the traced peak; asserted: 1); fp32 LoRA (frozen
    weight, fp32 input) keeps the same input either way."""
    from slimtune.methods import make_config
    from slimtune.models.families import family_config
    from slimtune.plan.trace import trace_step

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip
    config = family_config("llama", **small)
    ours = trace_step(config, make_config(method), 2, 32, dtype).peak["activations"]
    monkeypatch.setattr(activations, "checkpoint_norms", lambda model: 0)
    theirs = trace_step(config, make_config(method), 2, 32, dtype).peak["activations"]
    elements = 2 * small["num_hidden_layers"] * 2 * 32 * small["hidden_size"]  # norms x tokens x hidden
    roots = 2 * small["num_hidden_layers"] * 2 * 32 * 4  # each norm's fp32 [tokens, 1] reciprocal root
    assert at_least * elements <= theirs - ours <= 8 * elements + roots
    if not at_least:
        assert 0 <= theirs - ours <= roots


def test_norms_run_checkpointed_and_the_same():
    data = caps.batch()
    ours, theirs = adapt("full"), adapt("full", fused=False)
    norms = [m for m in ours.model.modules() if "forward" in vars(m) and type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * ours.model.config.num_hidden_layers  # (the final norm, outside the layers: not)
    torch.manual_seed(0)
    _, grads = loss_and_grads(ours.model, data)
    torch.manual_seed(0)
    _, ref = loss_and_grads(theirs.model, data)
    assert all(torch.equal(g, ref[n]) for n, g in grads.items())
