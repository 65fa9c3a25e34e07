"""MEFT (host-resident sparse parallel adapter): the acceptance checks of docs/methods/meft.md on a tiny Llama
(hidden 64, 2 layers). On this CPU-only machine "host" and "compute device" are the same; the accounting still
states what would live where."""

import pytest
import torch

from slimtune.core.errors import ConfigError
from slimtune.methods import apply, make_config
from slimtune.methods.meft.layer import Selection, select_topk, union_rows
from slimtune.models.loading import tiny_llama
from tests.conftest import batch

D = 64


def make(**kw):
    torch.manual_seed(0)
    kw = {"r": 64, "k": 8, "experts": 8, "n_probe": 4, **kw}
    return apply(tiny_llama(seed=0), make_config("meft", **kw))


def randomize_values(a, seed=1):
    g = torch.Generator().manual_seed(seed)
    for st in a.stores:
        st.values.data.copy_(torch.randn(st.values.shape, generator=g) * 0.1)


def dense_reference(a, gate_by_router: bool):
    """The same base model with a dense ReLU parallel adapter on every MLP: out += ReLU(x Kᵀ [⊙ gate]) V, with
    K, V (and the router) as ordinary leaf tensors."""
    ref = tiny_llama(seed=0)
    leaves = []
    for i, (layer, st) in enumerate(zip(ref.model.layers, a.stores)):
        k = st.keys.data.clone().requires_grad_()
        v = st.values.data.clone().requires_grad_()
        router = None
        if gate_by_router:
            src = a.model.model.layers[i].mlp.meft_adapter.router.weight
            router = src.detach().clone().requires_grad_()
        leaves.append((k, v, router))

        def hook(m, args, out, k=k, v=v, router=router):
            x = args[0] * a.run.input_scale  # the adapter computes on c·x (read after ``a`` calibrated)
            pre = x @ k.t()
            if router is not None:
                nk = k.shape[0] // router.shape[0]
                pre = pre * (x @ router.t()).repeat_interleave(nk, dim=-1)
            return out + torch.relu(pre) @ v

        layer.mlp.register_forward_hook(hook)
    return ref, leaves


def backward(model, data):
    model.train()
    out = model(**data)
    out.loss.backward()
    return out


# 1. dense parity
@pytest.mark.parametrize("semantics", ["mask", "union"])
def test_k_equals_r_matches_a_dense_relu_parallel_adapter(semantics):
    a = make(r=32, k=32, experts=0, semantics=semantics)
    randomize_values(a)
    ref, leaves = dense_reference(a, gate_by_router=False)
    data = batch()
    out, expected = backward(a.model, data), backward(ref, data)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for st, (k, v, _) in zip(a.stores, leaves):
        torch.testing.assert_close(st.keys.grad, k.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st.values.grad, v.grad, atol=1e-6, rtol=1e-5)


def test_key_experts_probing_all_experts_matches_a_gated_dense_adapter_router_included():
    a = make(r=32, k=32, experts=4, n_probe=4, semantics="union")
    randomize_values(a)
    ref, leaves = dense_reference(a, gate_by_router=True)
    data = batch()
    out, expected = backward(a.model, data), backward(ref, data)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for i, (st, (k, v, router)) in enumerate(zip(a.stores, leaves)):
        torch.testing.assert_close(st.keys.grad, k.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st.values.grad, v.grad, atol=1e-5, rtol=1e-4)
        got = a.model.model.layers[i].mlp.meft_adapter.router.weight.grad
        torch.testing.assert_close(got, router.grad, atol=1e-5, rtol=1e-4)


# input scale: one learning rate for models whose MLP inputs differ in norm
def mlp_input_norm(model, data) -> float:
    """The mean L2 norm of the MLP inputs of ``model`` (every layer, non-padding tokens) on ``data``."""
    seen = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][data["attention_mask"].bool()]))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model.eval()(**data)
    for h in hooks:
        h.remove()
    return float(torch.cat(seen).norm(dim=-1).mean())


def test_input_scale_is_measured_once_on_the_first_training_batch():
    first, later = batch(seed=0), batch(seed=1)
    mean = mlp_input_norm(tiny_llama(seed=0), first)
    a = make(input_norm=2.5)
    a.model.eval()(**first)  # an evaluation before training measures nothing
    assert not a.run.calibrated and float(a.run.input_scale) == 1.0
    backward(a.model, first)
    assert float(a.run.input_scale) == pytest.approx(2.5 / mean, rel=1e-5)
    backward(a.model, later)
    assert float(a.run.input_scale) == pytest.approx(2.5 / mean, rel=1e-5)  # once, not per batch
    raw = make(input_norm=0)
    backward(raw.model, first)
    assert float(raw.run.input_scale) == 1.0


def scaled_mlp_inputs(factor: float):
    """The tiny model computing the same function with its MLP inputs ``factor`` times larger: the norm before
    each MLP scaled up, the MLP's input projections scaled down."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(factor)
            layer.mlp.gate_proj.weight.div_(factor)
            layer.mlp.up_proj.weight.div_(factor)
    return model


def train(model, input_norm: float, steps: int = 6, lr: float = 1e-4) -> tuple[list[float], float]:
    """The losses of ``steps`` MEFT steps at one lr, and how far the logits on a held-out batch moved."""
    torch.manual_seed(0)
    probe = batch(seed=99)
    with torch.no_grad():
        start = model.eval()(**probe).logits
    a = apply(model, make_config("meft", r=64, k=8, experts=8, n_probe=4, input_norm=input_norm))
    opt = torch.optim.AdamW(a.param_groups(0.0), lr=lr, weight_decay=0.0)
    losses = []
    for s in range(steps):
        a.on_step_start(s)
        losses.append(float(backward(a.model, batch(seed=s)).loss))
        opt.step()
        a.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        moved = float((a.model.eval()(**probe).logits - start).norm() / start.norm())
    return losses, moved


def test_the_same_lr_trains_the_same_when_the_mlp_inputs_are_ten_times_larger():
    """With ``input_norm`` the adapter's training does not depend on the scale of its input; on the raw input
    (``input_norm: 0``) the same lr moves the 10x model far more (Qwen's MLP inputs are ~11x SmolLM2's)."""
    losses, moved = train(tiny_llama(seed=0), input_norm=4.0)
    losses10, moved10 = train(scaled_mlp_inputs(10.0), input_norm=4.0)
    torch.testing.assert_close(losses10, losses, rtol=2e-4, atol=2e-4)
    assert moved > 0 and moved10 == pytest.approx(moved, rel=1e-2)
    _, raw = train(tiny_llama(seed=0), input_norm=0.0)
    _, raw10 = train(scaled_mlp_inputs(10.0), input_norm=0.0)
    assert raw10 > 10 * raw


# 2. zero init
def test_starts_exactly_at_the_base_model():
    a = make()
    data = batch()
    assert torch.equal(a.model.eval()(**data).logits, tiny_llama(seed=0).eval()(**data).logits)


# 3. selection
def test_selection_equals_brute_force_and_experts_only_offer_probed_candidates():
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(20, D, generator=g), torch.randn(256, D, generator=g)
    sel = select_topk(x, keys, 8)
    assert torch.equal(sel.idx, (x @ keys.t()).topk(8).indices) and sel.dots_per_token == 256
    logits = torch.randn(20, 16, generator=g)
    ke = select_topk(x, keys, 8, logits, n_probe=3)
    assert ke.dots_per_token == 16 + 3 * 16  # N + n_p * r/N, not r
    expert = ke.idx // 16
    assert all(set(expert[t].tolist()) <= set(ke.probe[t].tolist()) for t in range(20))
    gated = (x @ keys.t()) * logits.repeat_interleave(16, dim=1)
    probed = torch.zeros(20, 16, dtype=torch.bool).scatter_(1, logits.topk(3).indices, True)
    gated[~probed.repeat_interleave(16, dim=1)] = float("-inf")
    assert torch.equal(ke.idx, gated.topk(8).indices)
    torch.testing.assert_close(ke.act, gated.topk(8).values)


def test_union_and_cap_keep_the_highest_aggregated_rows_not_the_lowest_indices():
    idx = torch.tensor([[0, 5, 9], [5, 9, 7], [1, 9, 3]])
    act = torch.tensor([[0.1, 2.0, 1.0], [3.0, 1.0, -1.0], [0.2, 0.5, 0.05]])
    s, keep = union_rows(Selection(idx, act, None, 10), 10)
    assert s.tolist() == [0, 1, 3, 5, 9]  # 7 had a negative activation: ReLU makes it 0, it is not moved
    assert keep.tolist() == [[True, True, True], [True, True, False], [True, True, True]]
    s, keep = union_rows(Selection(idx, act, None, 10), 10, cap=2)
    assert s.tolist() == [5, 9]  # aggregated: 5 -> 5.0, 9 -> 2.5, 0 -> 0.1, 1 -> 0.2, 3 -> 0.05
    assert keep.tolist() == [[False, True, True], [True, True, False], [False, True, False]]


# 4 + 5. lazy Adam locality, AdamW equivalence, accumulation, clipping, overflow
def step(a, opt, batches, clip=None):
    a.on_step_start(0)
    for data in batches:
        backward(a.model, data)
    norm = None
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(a.trainable_parameters(), clip)
    opt.step()
    a.optimizer_step(opt)
    opt.zero_grad(set_to_none=True)
    a.on_step_end(1)
    return norm


def snapshot(a):
    out = []
    for st in a.stores:
        snap = {"step": st.step.clone()}
        for name, p in (("keys", st.keys), ("values", st.values)):
            snap[name] = p.data.clone()
            snap[name + ".exp_avg"] = st.state[p]["exp_avg"].clone()
            snap[name + ".exp_avg_sq"] = st.state[p]["exp_avg_sq"].clone()
        out.append(snap)
    return out


def test_untouched_rows_are_bit_identical_and_touched_rows_follow_adamw():
    a = make(r=256, k=4, experts=0, cap=16)
    randomize_values(a)
    opt = torch.optim.AdamW(a.param_groups(0.0), lr=1e-2)
    step(a, opt, [batch(seed=0)])  # a first step so some rows have moments and step counts
    before = snapshot(a)
    a.on_step_start(1)
    backward(a.model, batch(seed=1))
    touched = [st.touched.clone() for st in a.stores]
    grads = [{"keys": st.keys.grad.clone(), "values": st.values.grad.clone()} for st in a.stores]
    opt.step()
    a.optimizer_step(opt)
    after = snapshot(a)
    for b, c, t, g in zip(before, after, touched, grads):
        assert 0 < int(t.sum()) <= 16
        for name in b:
            assert torch.equal(b[name][~t], c[name][~t]), name
        assert torch.equal(c["step"][t], b["step"][t] + 1)
        assert (
            int((b["step"][t] > 0).sum()) > 0
        )  # some touched rows were also touched before: real step counts
        for r in t.nonzero().flatten().tolist():  # torch's AdamW on the row, with the row's own step count
            for name in ("keys", "values"):
                p = torch.nn.Parameter(b[name][r].clone())
                ref = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
                ref.state[p] = {
                    "step": torch.tensor(float(b["step"][r])),
                    "exp_avg": b[name + ".exp_avg"][r].clone(),
                    "exp_avg_sq": b[name + ".exp_avg_sq"][r].clone(),
                }
                p.grad = g[name][r].clone()
                ref.step()
                torch.testing.assert_close(c[name][r], p.data, atol=1e-7, rtol=1e-6)


def test_dense_emulation_equals_torch_adamw_with_accumulation():
    """k = r, brute force, dense_emulation: the host Adam must equal torch's AdamW on the dense adapter."""
    a = make(r=32, k=32, experts=0, semantics="union", dense_emulation=True)
    randomize_values(a)
    ref, leaves = dense_reference(a, gate_by_router=False)
    ref_params = [t for k, v, _ in leaves for t in (k, v)]
    opt_a = torch.optim.AdamW(a.param_groups(0.0), lr=5e-3, weight_decay=0.0)
    opt_r = torch.optim.AdamW(ref_params, lr=5e-3, weight_decay=0.0)
    for s in range(5):
        micro = [batch(seed=10 * s), batch(seed=10 * s + 1)]
        step(a, opt_a, micro)
        for data in micro:
            backward(ref, data)
        opt_r.step()
        opt_r.zero_grad()
    for st, (k, v, _) in zip(a.stores, leaves):
        torch.testing.assert_close(st.keys.data, k.data, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st.values.data, v.data, atol=1e-5, rtol=1e-4)


def test_accumulation_sums_rows_of_different_micro_batches_and_clipping_sees_them():
    a = make(r=256, k=4, experts=0, cap=8)
    randomize_values(a)
    a.on_step_start(0)
    backward(a.model, batch(seed=0))
    first = a.stores[0].touched.clone()
    g_first = a.stores[0].values.grad.clone()
    backward(a.model, batch(seed=7))
    union = a.stores[0].touched
    assert int(union.sum()) > int(first.sum())  # the second micro-batch touched other rows too
    second_only = union & ~first
    assert torch.equal(a.stores[0].values.grad[first & ~union], g_first[first & ~union])
    assert a.stores[0].values.grad[second_only].abs().sum() > 0
    total = torch.sqrt(
        sum((p.grad.double() ** 2).sum() for p in a.trainable_parameters() if p.grad is not None)
    )
    norm = torch.nn.utils.clip_grad_norm_(a.trainable_parameters(), 1e-3)
    torch.testing.assert_close(norm.double(), total, rtol=1e-5, atol=0)
    clipped = torch.sqrt(
        sum((p.grad.double() ** 2).sum() for p in a.trainable_parameters() if p.grad is not None)
    )
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)


def test_non_finite_gradients_skip_the_host_step():
    a = make(r=64, k=4, experts=0)
    randomize_values(a)
    opt = torch.optim.AdamW(a.param_groups(0.0), lr=1e-2)
    a.on_step_start(0)
    backward(a.model, batch())
    rows = a.stores[0].touched.nonzero().flatten()
    a.stores[0].values.grad[rows[0]] = float("inf")
    before = snapshot(a)
    a.optimizer_step(opt)
    after = snapshot(a)
    assert a.extra_state["skipped_steps"] == 1
    assert all(torch.equal(b[n], c[n]) for b, c in zip(before, after) for n in b)
    assert not any(st.touched.any() for st in a.stores)


# 6 + 7. memory and traffic accounting
def test_device_bytes_and_traffic_follow_the_formulas():
    a = make(r=256, k=8, experts=16, n_probe=4, cap=32)
    data = batch()
    a.on_step_start(0)
    backward(a.model, data)
    a.on_step_end(1)
    rows = a.run.rows
    assert len(rows) == 2 and all(0 < s <= 32 for s in rows)
    tokens = data["attention_mask"].sum().item()
    for i, s in enumerate(rows):
        label = f"layer{i}"
        assert a.traffic.h2d[label] == 2 * D * s * 4
        assert (
            a.traffic.d2h[label] == tokens * D * 4 + tokens * 16 * 4 + 2 * D * s * 4
        )  # x, router logits, grads
    report = a.memory_report()
    router = sum(p.numel() * 4 for p in a.model.parameters() if p.requires_grad)
    assert report["device_adapter"] == sum(s * 2 * D * (4 + 4) for s in rows) + router
    assert report["host_offloaded"] == 2 * 256 * D * 4 * 2  # keys + values, 2 layers
    assert report["host_optimizer"] == 2 * (2 * 2 * 256 * D * 4 + 256 * 8)
    assert a.extra_state["beta"] == pytest.approx(sum(rows) / len(rows) / 8, abs=0.01)


# 10. robustness
def test_gradient_checkpointing_reuses_the_gathered_rows():
    data = batch()
    plain = make(r=128, k=8, cap=24)
    randomize_values(plain)
    backward(plain.model, data)
    ckpt = make(r=128, k=8, cap=24)
    randomize_values(ckpt)
    ckpt.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backward(ckpt.model, data)
    for s1, s2 in zip(plain.stores, ckpt.stores):
        assert torch.equal(s1.touched, s2.touched)
        torch.testing.assert_close(s1.values.grad, s2.values.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s1.keys.grad, s2.keys.grad, atol=1e-6, rtol=1e-5)


def test_save_load_round_trips_store_moments_and_steps(tmp_path):
    a = make(r=64, k=4)
    randomize_values(a)
    opt = torch.optim.AdamW(a.param_groups(0.0), lr=1e-2)
    step(a, opt, [batch()])
    a.save(tmp_path / "m")
    b = make(r=64, k=4)
    b.load(tmp_path / "m")
    assert b.run.calibrated and torch.equal(b.run.input_scale, a.run.input_scale)
    assert float(a.run.input_scale) != 1.0  # measured, and restored rather than measured again
    assert a.extra_state["input_scale"] == round(float(a.run.input_scale), 4)  # the step record shows it
    for s1, s2 in zip(snapshot(a), snapshot(b)):
        assert all(torch.equal(s1[n], s2[n]) for n in s1)
    data = batch(seed=4)
    assert torch.equal(a.model.eval()(**data).logits, b.model.eval()(**data).logits)


def test_bad_meft_configs_are_reported_by_key():
    with pytest.raises(ConfigError, match="experts: 48 does not divide r=4096"):
        make_config("meft", r=4096, experts=48)
    with pytest.raises(ConfigError, match="k: 64 exceeds the candidates per token"):
        make_config("meft", r=256, experts=64, n_probe=4, k=64)
    with pytest.raises(ConfigError, match="cap: 8 must be 0 or >= k"):
        make_config("meft", cap=8)
