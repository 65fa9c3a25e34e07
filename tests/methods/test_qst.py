"""QST acceptance checks (docs/methods/qst.md) on tiny Llamas, plus the 7B accounting on the meta device."""

import pytest
import torch

from slimtune.core.errors import ConfigError
from slimtune.methods import apply, make_config
from slimtune.methods.qst import QSTConfig
from slimtune.methods.qst.layer import SideNetwork
from slimtune.models.loading import tiny_llama
from slimtune.models.shapes import build_shape, shape_config
from slimtune.modules.quant.backbone import bnb_works, nf4_weight_bytes, quantize_decoder
from tests.conftest import batch

DOWNSAMPLES = ["adapter", "lora", "linear", "maxpool", "avgpool"]


def make(**kw):
    torch.manual_seed(0)
    kw = {"r": 4, "backend": "torch", "dropout": 0.0, **kw}
    return apply(tiny_llama(seed=0), make_config("qst", **kw))


def perturb_alpha(a, value=0.7):
    with torch.no_grad():
        a.model.qst.alpha.fill_(value)


# 1. exactly the side parameters train, all get gradients, and the trainer's optimizer holds them all
def test_trainable_set_and_gradients_and_optimizer():
    from slimtune.data.records import Encoded
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    a = make()
    names = {n for n, _ in a.named_trainable_parameters()}
    assert names and all(n.startswith("qst.") for n in names)
    assert {n.split(".")[1] for n in names} == {"down", "gamma", "side", "up", "alpha"}
    assert {n.split(".")[2] for n in names if n.startswith("qst.side.")} == {"layers", "norm"}
    assert not any(p.requires_grad for n, p in a.model.named_parameters() if n.startswith("backbone."))
    perturb_alpha(a)
    a.model.train()
    out = a.model(**batch())
    out.loss.backward()
    missing = [n for n, p in a.named_trainable_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
    assert all(p.grad is None for n, p in a.model.named_parameters() if n.startswith("backbone."))
    rows = [[5, 6, 7, 8]] * 4
    trainer = Trainer(
        a,
        type("T", (), {"pad_token_id": 0})(),
        TrainConfig(steps=1, batch_size=2),
        Encoded(rows, rows),
        Encoded([], []),
        [],
        None,
        "/tmp/unused",
    )
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in a.trainable_parameters()}


# 2. the backbone is genuinely 4-bit, and the accounting at LLaMA-2-7B scale
def test_backbone_is_4bit_and_7b_accounting():
    a = make()
    for name, mod in a.model.backbone.model.layers.named_modules():
        assert type(mod) is not torch.nn.Linear, name
    floats = [n for n, p in a.model.backbone.named_parameters() if p.is_floating_point() and p.ndim == 2]
    assert floats == ["model.embed_tokens.weight"]  # tied head: the only 2-D float weight kept
    est = nf4_weight_bytes(build_shape("llama2-7b", device="meta"))
    assert est["codes"] == pytest.approx(3.24e9, rel=0.01)
    assert est["scales"] == pytest.approx(0.10e9, rel=0.05)
    assert est["other"] == pytest.approx(0.52e9, rel=0.01)
    assert est["total"] == pytest.approx(3.87e9, rel=0.01)


# 3. the paper's parameter counts (Table 6) on a LLaMA-2-7B config built on the meta device
@pytest.mark.parametrize(
    "kind,total,share",
    [
        ("adapter", 28_623_104, 7.84),
        ("lora", 28_623_104, 7.84),
        ("linear", 59_932_928, 55.99),
        ("maxpool", 26_378_496, 0.0),
        ("avgpool", 26_378_496, 0.0),
    ],
)
def test_llama2_7b_parameter_counts(kind, total, share):
    with torch.device("meta"):
        side = SideNetwork(shape_config("llama2-7b"), QSTConfig(r=16, downsample=kind))
    n = sum(p.numel() for p in side.parameters())
    down = sum(p.numel() for p in side.down.parameters())
    assert n == total and round(100 * down / n, 2) == share


def test_smollm2_side_size():
    with torch.device("meta"):
        side = SideNetwork(shape_config("smollm2-135m"), QSTConfig(r=16))
    assert sum(p.numel() for p in side.parameters()) == 735_804


# 4. init equivalence at alpha = 1, and learning on a toy task
@pytest.mark.parametrize("kind", DOWNSAMPLES)
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_starts_exactly_at_the_quantized_base(kind, gate):
    a = make(downsample=kind, gate_shape=gate)
    ref = tiny_llama(seed=0)
    quantize_decoder(ref, "torch", double_quant=True)
    data = batch()
    out, expected = a.model.eval()(**data), ref.eval()(**data)
    assert torch.equal(out.logits, expected.logits)
    assert out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    if kind == "maxpool":  # the training-mode (fused, logit-free) loss is the same number
        train_out = a.model.train()(**data)
        assert train_out.logits is None
        assert train_out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)


def test_fused_training_loss_gives_the_same_side_gradients_as_plain_logits():
    a, b = make(downsample="adapter", dropout=0.0), make(downsample="adapter", dropout=0.0, fused_loss=False)
    b.model.load_state_dict(a.model.state_dict())
    perturb_alpha(a)  # move alpha off 1 so the side network is in the loss
    perturb_alpha(b)
    data = batch()
    la, lb = a.model.train()(**data), b.model.train()(**data)
    assert la.logits is None and lb.logits is not None
    la.loss.backward()
    lb.loss.backward()
    assert la.loss.item() == pytest.approx(lb.loss.item(), abs=1e-5)
    for (n, p), (_, q) in zip(a.model.qst.named_parameters(), b.model.qst.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_training_loss_falls_on_a_toy_task():
    a = make(downsample="adapter")
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=1e-2)
    ids = torch.arange(3, 35).repeat(4, 1)  # a fixed phrase the random base does not know
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    a.model.train()
    losses = []
    for _ in range(100):
        loss = a.model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    assert a.model.qst.alpha.mean().item() < 1.0  # alpha and the gates are really stepped
    assert not torch.allclose(a.model.qst.gamma, torch.zeros_like(a.model.qst.gamma))


# 5. nothing saved for backward inside the backbone, and no inference_mode
def test_backbone_forward_saves_nothing(monkeypatch):
    a = make()
    perturb_alpha(a)
    saved = []
    real = a.model.run_backbone

    def counted(*args, **kw):
        assert not torch.is_inference_mode_enabled()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            states, h = real(*args, **kw)
        assert not any(s.requires_grad for s in states) and not h.requires_grad
        assert not any(s.is_inference() for s in states)
        return states, h

    monkeypatch.setattr(a.model, "run_backbone", counted)
    a.model.train()
    a.model(**batch()).loss.backward()
    assert saved == []


def _full_width_saved(a, data) -> int:
    d = a.model.config.hidden_size
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        a.model(**data)
    b, t = data["input_ids"].shape
    return sum(1 for s in shapes if s and s[-1] == d and torch.Size(s).numel() == b * t * d)


def test_trainable_downsamples_retain_one_state_per_layer_pooling_none():
    data = batch()
    n_layers = tiny_llama().config.num_hidden_layers
    adapter, pool = make(downsample="adapter"), make(downsample="maxpool")
    perturb_alpha(adapter)
    perturb_alpha(pool)
    assert _full_width_saved(adapter, data) - _full_width_saved(pool, data) == n_layers + 1


# 6. gradients equal a reference that recomputes the backbone with grad and detaches its states
def test_gradient_parity_with_detached_recompute():
    a = make(downsample="adapter")
    perturb_alpha(a)
    data = batch()
    a.model.train()
    a.model(**data).loss.backward()
    got = {n: p.grad.clone() for n, p in a.named_trainable_parameters()}
    a.model.zero_grad()
    m = a.model
    pos = torch.arange(data["input_ids"].shape[1]).unsqueeze(0)
    states = []
    dec = m.backbone.model
    hooks = [dec.embed_tokens.register_forward_hook(lambda mod, i, o: states.append(o))]
    hooks += [lay.register_forward_hook(lambda mod, i, o: states.append(o)) for lay in dec.layers]
    with torch.enable_grad():
        h_final = dec(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
    for h in hooks:
        h.remove()
    h = m.qst([s.detach() for s in states], h_final.detach(), data["attention_mask"], pos)
    logits = m.backbone.lm_head(h)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), data["labels"][:, 1:].reshape(-1)
    )
    loss.backward()
    for n, p in a.named_trainable_parameters():
        assert torch.allclose(p.grad, got[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("kind", DOWNSAMPLES)
def test_gradcheck_downsamples_float64(kind):
    """float64 gradcheck of each downsample (the side layers are transformers' own LlamaDecoderLayer, whose
    RMSNorm computes in fp32, so the whole side network is covered by the parity test above instead)."""
    from torch.func import functional_call

    from slimtune.methods.qst.layer import Downsample

    torch.manual_seed(0)
    mod = Downsample(kind, 16, 4, rank=3, dropout=0.0).double()
    names = [n for n, _ in mod.named_parameters()]
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    values = tuple(p.detach().clone().requires_grad_(True) for p in mod.parameters())

    def fn(inp, *ps):
        return functional_call(mod, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *values), eps=1e-6, atol=1e-6)


# 7. the activation memory QST keeps grows far slower than back-propagating through the backbone
def _saved_bytes(fn) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if not isinstance(t, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_activation_memory_vs_backprop_through_backbone():
    qst = make(downsample="adapter")
    lora = apply(tiny_llama(seed=0), make_config("qlora", r=4, backend="torch"))
    grow = {}
    for name, a in (("qst", qst), ("qlora", lora)):
        small = _saved_bytes(lambda m=a.model: m(**batch(t=16)).loss)
        large = _saved_bytes(lambda m=a.model: m(**batch(t=64)).loss)
        grow[name] = large - small
        assert large > small
    assert grow["qst"] < 0.6 * grow["qlora"], grow


# 8. works with the pure-torch NF4 and with bitsandbytes, identical 4-bit codes
def test_backends_same_codes():
    if not bnb_works(torch.device("cpu")):
        pytest.skip("bitsandbytes 4-bit not usable here")
    a, b = make(backend="torch"), make(backend="bitsandbytes")
    qa = a.model.backbone.model.layers[0].mlp.down_proj
    qb = b.model.backbone.model.layers[0].mlp.down_proj
    assert torch.equal(qa.qweight, qb.weight.data)


# 9. config validation
def test_bad_configs():
    with pytest.raises(
        ConfigError, match="downsample: 'conv' is not one of adapter, lora, linear, maxpool, avgpool"
    ):
        QSTConfig(downsample="conv")
    with pytest.raises(ConfigError, match="r: 3 does not divide the hidden size 64"):
        make(r=3)
    with pytest.raises(ConfigError, match="side width 32 is not a multiple of the 3 attention heads"):
        apply(tiny_llama(heads=3, kv_heads=1, hidden_size=96, intermediate_size=192), make_config("qst", r=3))


# generation: the two KV caches give the same tokens as recomputing the whole sequence each step
def test_cached_generation_equals_recompute():
    a = make()
    perturb_alpha(a, 0.5)
    with torch.no_grad():
        for p in a.model.qst.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, 256, (2, 7))
    mask = torch.ones_like(ids)
    fast = a.generate(ids, mask, 6, eos_token_id=None, pad_token_id=0)
    seq = ids
    for _ in range(6):
        nxt = a.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(fast, seq[:, 7:])


def test_merge_explains_why_not():
    with pytest.raises(NotImplementedError, match="QST cannot be merged"):
        make().merge()


def test_backbone_stays_in_eval_mode_when_training():
    a = make()
    a.model.train()
    assert a.model.qst.training
    assert not any(m.training for m in a.model.backbone.modules())
