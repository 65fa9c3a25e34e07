"""QST ``init: backbone``: the side layers are sub-blocks of the backbone's, chosen by weight magnitude."""

import pytest
import torch

from slimtune.core.errors import UserError
from slimtune.methods import apply, make_config
from slimtune.models.families import FAMILIES, tiny_model
from tests.conftest import batch

PRUNABLE = [f for f in FAMILIES if f not in ("phi3", "gpt_neox")]


def qst(model, **kw):
    torch.manual_seed(0)
    return apply(model, make_config("qst", **{"r": 4, "backend": "torch", "dropout": 0.0, **kw}))


def plant(model, seed=1):
    """Make chosen units dominant (x10 on the weights that read or write them); return what was planted. Half of
    the residual channels are planted only where they are read, half only where they are written, and only the
    first dimension of each rotary pair is planted, so the score must count both sides and keep pairs whole."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    d, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = model.model.layers[0].self_attn.q_proj.out_features // heads
    hidden = torch.randperm(d, generator=g)[: d // 4].sort().values
    pairs = torch.randperm(hd // 2, generator=g)[: (d // 4 // heads) // 2].sort().values
    qk = torch.cat([pairs, pairs + hd // 2])
    vd = torch.randperm(hd, generator=g)[: d // 4 // heads].sort().values
    ffs = []
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            read, written = hidden[::2], hidden[1::2]
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight[:, read] *= 10
            a.o_proj.weight[written] *= 10
            m.down_proj.weight[written] *= 10
            for lin, n in ((a.q_proj, heads), (a.k_proj, kv)):
                lin.weight.view(n, hd, d)[:, pairs] *= 10
            a.v_proj.weight.view(kv, hd, d)[:, vd] *= 10
            a.o_proj.weight.view(d, heads, hd)[:, :, vd] *= 10
            ff = torch.randperm(m.gate_proj.out_features, generator=g)[: m.gate_proj.out_features // 4]
            ff = ff.sort().values
            m.gate_proj.weight[ff] *= 10
            m.up_proj.weight[ff] *= 10
            m.down_proj.weight[:, ff] *= 10
            ffs.append(ff)
    rows = lambda dims, n: (torch.arange(n)[:, None] * hd + dims[None]).flatten()  # noqa: E731
    return hidden, ffs, rows(qk, heads), rows(qk, kv), rows(vd, kv), rows(vd, heads)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_side_tensors_are_the_planted_sub_blocks(family):
    model = tiny_model(family)
    hidden, ffs, q, k, v, o = plant(model)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    side = qst(model, init="backbone").model.qst.side
    for i, layer in enumerate(side.layers):
        b = lambda name, i=i: ref[f"model.layers.{i}.{name}"]  # noqa: E731
        a, m = layer.self_attn, layer.mlp
        torch.testing.assert_close(
            a.q_proj.weight, b("self_attn.q_proj.weight")[q][:, hidden], rtol=0, atol=0
        )
        torch.testing.assert_close(
            a.k_proj.weight, b("self_attn.k_proj.weight")[k][:, hidden], rtol=0, atol=0
        )
        torch.testing.assert_close(
            a.v_proj.weight, b("self_attn.v_proj.weight")[v][:, hidden], rtol=0, atol=0
        )
        torch.testing.assert_close(
            a.o_proj.weight, b("self_attn.o_proj.weight")[hidden][:, o], rtol=0, atol=0
        )
        if family == "qwen2":
            torch.testing.assert_close(a.q_proj.bias, b("self_attn.q_proj.bias")[q], rtol=0, atol=0)
            torch.testing.assert_close(a.v_proj.bias, b("self_attn.v_proj.bias")[v], rtol=0, atol=0)
        torch.testing.assert_close(
            m.gate_proj.weight, b("mlp.gate_proj.weight")[ffs[i]][:, hidden], rtol=0, atol=0
        )
        torch.testing.assert_close(
            m.down_proj.weight, b("mlp.down_proj.weight")[hidden][:, ffs[i]], rtol=0, atol=0
        )
        torch.testing.assert_close(
            layer.input_layernorm.weight, b("input_layernorm.weight")[hidden], rtol=0, atol=0
        )
    torch.testing.assert_close(side.norm.weight, ref["model.norm.weight"][hidden], rtol=0, atol=0)


@pytest.mark.parametrize("family", PRUNABLE)
def test_every_prunable_family_starts_at_the_base_model_and_trains(family):
    data = batch(vocab=256, seed=3)
    base = qst(tiny_model(family), init="random")
    pruned = qst(tiny_model(family), init="backbone")
    with torch.no_grad():
        same = [
            m.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
            for m in (base, pruned)
        ]
    torch.testing.assert_close(
        same[0], same[1], rtol=0, atol=0
    )  # alpha = 1: both are the quantized base model
    # the side layers really hold the backbone's (non-random) weights: each side q row is a backbone q row's slice
    side_q = pruned.model.qst.side.layers[0].self_attn.q_proj.weight
    rand_q = base.model.qst.side.layers[0].self_attn.q_proj.weight
    assert not torch.equal(side_q, rand_q)
    pruned.model.train()
    loss = pruned.model(**data).loss
    loss.backward()
    grads = [p.grad for p in pruned.model.qst.side.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_fused_layers_are_refused_with_the_reason(family):
    with pytest.raises(
        UserError, match=r"method.init: backbone: .*(qkv|query_key_value|q_proj).*method.init=random"
    ):
        qst(tiny_model(family), init="backbone")
