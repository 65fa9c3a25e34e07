"""LoRA / QLoRA's one-matmul forward (methods/baselines/fused.py) against peft's own: same loss, same gradients;
peft's forward wherever the layer is not plain."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.methods import apply, make_config
from slimtune.models.loading import tiny_llama


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        self.ops[name] = self.ops.get(name, 0) + 1
        if isinstance(out, torch.Tensor):  # elements written, per op
            self.ops[name + ".numel"] = self.ops.get(name + ".numel", 0) + out.numel()
        return out


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def loss_and_grads(adapted, ids, unfused: bool = False):
    model = adapted.model
    layers = lora_layers(model)
    saved = {}
    if unfused:  # peft's own forward: drop the per-instance one
        for m in layers:
            saved[m] = m.__dict__.pop("forward")
    model.zero_grad(set_to_none=True)
    with CountOps() as ops:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    for m, fwd in saved.items():
        m.forward = fwd
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, ops.ops


def build(name, dtype=torch.float32, **kw):
    model = tiny_llama(seed=0).to(dtype)
    adapted = apply(model, make_config(name, r=8, alpha=16, **kw))
    for n, p in adapted.model.named_parameters():  # B is zero at init: make the update non-zero
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.05)
    return adapted


IDS = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name, kw, dtype, tol",
    [
        ("lora", {}, torch.float64, 1e-12),
        ("lora", {}, torch.float32, 1e-5),
        ("lora", {}, torch.bfloat16, 2e-2),  # (peft keeps the adapters in fp32 on a bf16 model)
        ("qlora", {"backend": "torch"}, torch.float32, 1e-5),
        ("qlora", {"backend": "bitsandbytes"}, torch.float32, 1e-5),
    ],
)
def test_the_fused_forward_gives_peft_s_loss_and_gradients(name, kw, dtype, tol):
    if kw.get("backend") == "bitsandbytes":
        from slimtune.modules.quant.backbone import bnb_works

        if not bnb_works(torch.device("cpu")):
            pytest.skip("bitsandbytes 4-bit does not run here")
    adapted = build(name, dtype, **kw)
    n_layers = len(lora_layers(adapted.model))
    assert n_layers == 14  # 7 projections x 2 layers, every one fused
    fused_loss, fused_grads, fused_ops = loss_and_grads(adapted, IDS)
    ref_loss, ref_grads, ref_ops = loss_and_grads(adapted, IDS, unfused=True)
    assert fused_ops.get("addmm", 0) - ref_ops.get("addmm", 0) == n_layers  # the update rides on the product
    tokens = IDS.numel()
    passes = sum(
        tokens * m.out_features for m in lora_layers(adapted.model)
    )  # one pass over every layer output
    elementwise = ("mul.numel", "add.numel")
    saved = sum(ref_ops.get(k, 0) - fused_ops.get(k, 0) for k in elementwise)
    # forward: the scaling and the sum; backward: the scaling of the gradient (now on the [tokens, r] side)
    assert saved >= 2.5 * passes
    torch.testing.assert_close(fused_loss, ref_loss, rtol=tol, atol=tol)
    assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) == 2 * n_layers
    for k in ref_grads:
        torch.testing.assert_close(
            fused_grads[k], ref_grads[k], rtol=tol, atol=tol * ref_grads[k].abs().max()
        )


def test_layers_that_are_not_plain_run_peft_s_forward():
    from slimtune.methods.baselines.fused import _plain_adapter

    x = torch.randn(2, 64)
    dropped = build("lora", dropout=0.1)
    assert all(_plain_adapter(m, x, (), {}) is None for m in lora_layers(dropped.model))
    adapted = build("lora")
    layer = lora_layers(adapted.model)[0]
    assert _plain_adapter(layer, x, (), {}) == "default"
    assert _plain_adapter(layer, x, (), {"adapter_names": ["default"]}) is None
    base = layer.base_layer(x)
    with adapted.model.disable_adapter():
        torch.testing.assert_close(layer(x), base)  # adapters off: the base alone
    assert not torch.allclose(layer(x), base)
    merged = adapted.merge()  # merged copy: peft's path, same function as the fused adapted layer
    out_adapted = adapted.model(input_ids=IDS).logits
    torch.testing.assert_close(merged(input_ids=IDS).logits, out_adapted, rtol=1e-4, atol=1e-4)
