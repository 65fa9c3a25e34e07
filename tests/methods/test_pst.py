"""PST (parameter-efficient sparse training): the tests of docs/methods/pst.md on a tiny Llama."""

import copy

import pytest
import torch
from torch import nn

from slimtune.core.errors import ConfigError, UserError
from slimtune.methods import apply, make_config
from slimtune.methods.pst.apply import (
    context_positions,
    cubic_sparsity,
    pst_layers,
    set_sparsity,
    sparsity_report,
)
from slimtune.methods.pst.layer import PSTLinear, n_pruned, nm_mask, topk_mask
from slimtune.models.loading import tiny_llama
from tests.conftest import batch


def make(**kw):
    torch.manual_seed(0)
    return apply(tiny_llama(seed=0), make_config("pst", **kw))


# 1. schedule
def test_cubic_schedule_values_and_validation():
    cfg = make_config("pst", sparsity=0.9)
    total = 1000
    assert cubic_sparsity(0, total, cfg) == 0.0 and cubic_sparsity(100, total, cfg) == 0.0
    assert cubic_sparsity(200, total, cfg) == pytest.approx(0.3792, abs=1e-4)
    assert cubic_sparsity(400, total, cfg) == pytest.approx(0.7875, abs=1e-4)
    assert cubic_sparsity(600, total, cfg) == pytest.approx(0.8958, abs=1e-4)
    assert cubic_sparsity(700, total, cfg) == pytest.approx(0.9, abs=1e-12)
    assert cubic_sparsity(701, total, cfg) == 0.9 and cubic_sparsity(1000, total, cfg) == 0.9
    values = [cubic_sparsity(t, total, cfg) for t in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ConfigError, match="cooldown_frac: warmup_frac \\+ cooldown_frac must be < 1"):
        make_config("pst", warmup_frac=0.6, cooldown_frac=0.4)
    with pytest.raises(ConfigError, match="sparsity: pattern 2:4 fixes sparsity at 0.5"):
        make_config("pst", pattern="2:4", sparsity=0.7)
    with pytest.raises(ConfigError, match="pattern"):
        make_config("pst", pattern="4:2")


# 2 + 9. exact sparsity, rounding, ties
def test_topk_mask_prunes_exactly_p_with_deterministic_ties():
    assert n_pruned(100, 0.29) == 29 and int(100 * 0.29) == 28  # the reference's float floor is off by one
    const = torch.ones(10, 10)
    m = topk_mask(const, 0.29)
    assert int((~m).sum()) == 29
    assert torch.equal(~m.flatten(), torch.arange(100) < 29)  # ties: lower index pruned first
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 48, generator=g).round(decimals=1)  # many ties
    for sp in (0.0, 0.1, 0.5, 0.9):
        m1, m2 = topk_mask(s, sp), topk_mask(s.clone(), sp)
        assert torch.equal(m1, m2) and int((~m1).sum()) == n_pruned(s.numel(), sp)
        if sp:
            assert s[~m1].max() <= s[m1].min()  # pruned scores never exceed kept ones


def test_nm_mask_keeps_two_of_every_four():
    s = torch.randn(8, 16)
    m = nm_mask(s, 2, 4)
    assert torch.equal(m.view(8, 4, 4).sum(-1), torch.full((8, 4), 2))
    top2 = s.view(8, 4, 4).topk(2, dim=-1).indices
    assert torch.equal(torch.zeros(8, 4, 4, dtype=torch.bool).scatter_(-1, top2, True).view(8, 16), m)
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.randn(2, 6), 2, 4)


def run_schedule(a, steps, lr=1e-2, data=None):
    """A plain loop that calls the hooks as the trainer does (after each optimizer step)."""
    a.total_steps = steps
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=lr)
    data = data or batch()
    losses, zeros = [], []
    for step in range(steps):
        a.on_step_start(step)
        a.model.train()
        loss = a.model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        a.on_step_end(step + 1)
        losses.append(loss.item())
        zeros.append(sum(int((~m.keep_mask()).sum()) for m in pst_layers(a.model).values()))
    return losses, zeros


def test_schedule_ends_with_exactly_floor_n_s_zeros_per_layer_and_loss_falls():
    a = make(sparsity=0.5)
    losses, zeros = run_schedule(a, 30)
    layers = pst_layers(a.model)
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        assert int((~layer.keep_mask()).sum()) == n_pruned(layer.base_layer.weight.numel(), 0.5), name
    expected = sum(n_pruned(m.base_layer.weight.numel(), 0.5) for m in layers.values())
    assert zeros[-1] == expected and zeros[20:] == [expected] * 10  # cool-down: the count is fixed
    assert zeros[0] == 0 and all(x <= y for x, y in zip(zeros, zeros[1:]))
    assert losses[-1] < 0.85 * losses[0]
    merged = a.merge()
    report = sparsity_report(merged)
    assert report["zeros"] >= expected and report["sparsity"] == pytest.approx(0.5, abs=1e-3)


# 3. merge equivalence, plain model, save/load
@pytest.mark.parametrize(
    "pattern,prior,scope",
    [
        ("unstructured", "magnitude", "local"),
        ("2:4", "magnitude", "local"),
        ("unstructured", "wanda", "local"),
        ("unstructured", "wanda", "row"),
    ],
)
def test_merge_equals_training_model_and_is_a_plain_llama(pattern, prior, scope, tmp_path):
    a = make(sparsity=0.5, pattern=pattern, score_prior=prior, nm_schedule="switch", scope=scope)
    run_schedule(a, 20)
    data = batch(seed=5)
    a.model.eval()
    expected = a.model(**data).logits
    merged = a.merge()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert {k: v.shape for k, v in merged.state_dict().items()} == {
        k: v.shape for k, v in tiny_llama(seed=0).state_dict().items()
    }
    torch.testing.assert_close(merged.eval()(**data).logits, expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "m")
    reloaded = type(merged).from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(reloaded(**data).logits, expected, atol=1e-5, rtol=0)
    if pattern == "2:4":  # 8. every group of 4 inputs has at most 2 non-zeros, the mask exactly 2
        for name, m in reloaded.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                assert int((m.weight.view(m.weight.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name
        for layer in pst_layers(a.model).values():
            k = layer.keep_mask()
            assert torch.equal(
                k.view(k.shape[0], -1, 4).sum(-1), torch.full((k.shape[0], k.shape[1] // 4), 2)
            )


# 4. trainable count
def test_trainable_tensors_and_count_formula_on_smollm2_geometry():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=30, vocab_size=49152, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    a = apply(model, make_config("pst"))
    names = [n for n, _ in a.named_trainable_parameters()]
    assert {n.rsplit(".", 1)[-1] for n in names} == {"pst_U", "pst_V", "pst_A", "pst_B", "pst_R", "pst_C"}
    assert sum(p.numel() for p in a.trainable_parameters()) == 5_189_760
    split = {k: sum(p.numel() for n, p in a.named_trainable_parameters() if n.endswith(k)) for k in "UVABRC"}
    assert split["U"] + split["V"] == 2_442_240 and split["A"] + split["B"] == 2_442_240
    assert split["R"] + split["C"] == 305_280


def test_extra_trainable_is_counted_and_unsupported_layers_are_refused():
    a = make(extra_trainable=["model.norm"])
    names = [n for n, _ in a.named_trainable_parameters()]
    assert "model.norm.weight" in names
    with pytest.raises(UserError, match="matches no module"):
        make(target_modules=["nope"])
    with pytest.raises(UserError, match="torch.nn.Linear only"):
        make(target_modules=["re:model\\.layers\\.0\\.mlp"])


# 5. identity at init
def test_starts_exactly_at_the_base_model():
    a = make()
    data = batch()
    assert torch.equal(a.model.eval()(**data).logits, tiny_llama(seed=0).eval()(**data).logits)


# 6. straight-through gradients in closed form
@pytest.mark.parametrize("to_weight", [True, False])
def test_ste_gradients_match_closed_forms(to_weight):
    torch.manual_seed(0)
    base = nn.Linear(12, 8, dtype=torch.float64)
    cfg = make_config("pst", weight_rank=3, score_rank=2, alpha_lowrank=0.7, alpha_struct=1.3,
                      score_grad_to_weight=to_weight)  # fmt: skip
    layer = PSTLinear(base, cfg).double()
    with torch.no_grad():
        for p in (layer.pst_V, layer.pst_B, layer.pst_R, layer.pst_C):
            p.normal_()
    layer.sparsity.fill_(0.4)
    x = torch.randn(5, 12, dtype=torch.float64)
    gy = torch.randn(5, 8, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    w = (base.weight + layer.pst_U @ layer.pst_V).detach()
    mask = layer.keep_mask().double()
    g = gy.t() @ x  # dL/d(M ⊙ W)
    gw = g * w
    torch.testing.assert_close(layer.pst_A.grad, 0.7 * gw @ layer.pst_B.detach().t())
    torch.testing.assert_close(layer.pst_B.grad, 0.7 * layer.pst_A.detach().t() @ gw)
    torch.testing.assert_close(layer.pst_R.grad, 1.3 * gw.sum(1))
    torch.testing.assert_close(layer.pst_C.grad, 1.3 * gw.sum(0))
    dw = mask * g + (torch.sign(w) * gw if to_weight else 0)
    torch.testing.assert_close(layer.pst_U.grad, dw @ layer.pst_V.detach().t())
    torch.testing.assert_close(layer.pst_V.grad, layer.pst_U.detach().t() @ dw)
    assert base.weight.grad is None and base.bias.grad is None


@pytest.mark.parametrize("prior", ["magnitude", "wanda"])
@pytest.mark.parametrize("to_weight", [True, False])
def test_fused_backward_equals_the_autograd_form(prior, to_weight):
    """The layer's hand-written backward (W rebuilt from U, V instead of W, S, M ⊙ W kept) gives what autograd
    gives through the plain form F.linear(x, (mask + S − S.detach()) ⊙ W)."""
    torch.manual_seed(1)
    cfg = make_config("pst", weight_rank=3, score_rank=2, weight_beta=0.5, alpha_lowrank=0.7, alpha_struct=1.3,
                      score_grad_to_weight=to_weight, score_prior=prior)  # fmt: skip
    layer = PSTLinear(nn.Linear(12, 8, dtype=torch.float64), cfg).double()
    with torch.no_grad():
        for p in (layer.pst_V, layer.pst_B, layer.pst_R, layer.pst_C):
            p.normal_()
        if prior == "wanda":
            layer.pst_in_scale.uniform_(0.5, 2.0)
    layer.sparsity.fill_(0.4)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 8, dtype=torch.float64)
    params = list(layer.pst_parameters())
    fused = layer(x)
    assert fused.grad_fn is not None and "PSTLinearFn" in type(fused.grad_fn).__name__
    got = torch.autograd.grad((fused * gy).sum(), [x, *params])
    plain = nn.functional.linear(x, layer.masked_weight(), layer.base_layer.bias)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    want = torch.autograd.grad((plain * gy).sum(), [x, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    y = layer(x)
    with torch.no_grad():
        layer.pst_U.add_(1.0)  # changed between forward and backward: refused, not silently wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y * gy).sum().backward()


# 7. mask dynamics and caching
def test_mask_is_cached_between_steps_and_eval_is_deterministic():
    a = make(sparsity=0.5)
    run_schedule(a, 12)
    layer = next(iter(pst_layers(a.model).values()))
    m1 = layer.keep_mask()
    assert layer.keep_mask() is m1  # unchanged parameters: no recomputation
    with torch.no_grad():
        layer.pst_R.add_(1.0)
    assert layer.keep_mask() is not m1
    a.model.eval()
    data = batch(seed=3)
    assert torch.equal(a.model(**data).logits, a.model(**data).logits)


def test_the_masked_weight_copy_is_kept_in_eval_mode_only():
    """A forward without autograd in training mode (the trainer's loss check) keeps no copy of M ⊙ W (a whole
    weight per layer: 3.9 GB for tinyllama-1.1b); one made in eval mode is dropped when training starts."""
    a = make(sparsity=0.5)
    layers = list(pst_layers(a.model).values())
    x = torch.randn(3, layers[0].base_layer.in_features)
    a.model.train()
    with torch.no_grad():
        y_train = layers[0](x)
    assert all(layer._weight_cache is None for layer in layers)
    a.model.eval()
    with torch.no_grad():
        assert torch.equal(layers[0](x), y_train)
    assert layers[0]._weight_cache is not None
    a.model.train()
    assert all(layer._weight_cache is None for layer in layers)


def test_forward_without_autograd_reuses_the_masked_weight_until_a_parameter_changes():
    a = make(sparsity=0.5)
    run_schedule(a, 12)
    layer = next(iter(pst_layers(a.model).values()))
    x = torch.randn(3, layer.base_layer.in_features)
    a.model.eval()  # the copy is kept in eval mode only (test below)

    def merged(x):
        return nn.functional.linear(x, layer.merged_linear().weight, layer.base_layer.bias)

    with torch.no_grad():
        y1 = layer(x)
        cached = layer._weight_cache[1]
        assert torch.equal(layer(x), y1) and layer._weight_cache[1] is cached  # built once, reused
        assert torch.equal(y1, merged(x))
        layer.pst_V.add_(0.1)  # what an optimizer step does
        y2 = layer(x)
        assert layer._weight_cache[1] is not cached and not torch.equal(y2, y1)
        assert torch.equal(y2, merged(x))
    y3 = layer(x)  # with autograd: the straight-through path, same value, and the copy is dropped
    assert y3.requires_grad and torch.equal(y3.detach(), y2) and layer._weight_cache is None
    layer.double()  # a move rebuilds both caches (new storage) instead of mixing dtypes
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64


def test_interval_reuses_masks_between_refreshes():
    a = make(sparsity=0.5, mask_update_interval=4)
    run_schedule(a, 10)
    layer = next(iter(pst_layers(a.model).values()))
    assert layer.freeze_mask  # step 10 is not a refresh step
    before = layer.keep_mask()
    with torch.no_grad():
        layer.pst_R.add_(torch.randn_like(layer.pst_R))
    assert layer.keep_mask() is before


# extension: score_prior=wanda (|W_ij| scaled by the rms of input feature j over the training tokens seen)
def test_wanda_prior_scales_the_magnitude_by_the_input_rms_and_is_checkpointed():
    a = make(sparsity=0.5, score_prior="wanda")
    data = batch()
    seen = {}
    name, layer = next(iter(pst_layers(a.model).items()))
    layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    assert torch.equal(layer.pst_in_scale, torch.ones_like(layer.pst_in_scale))  # before any step: |W|
    run_schedule(a, 1, data=data)
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    rms = x.pow(2).mean(0).sqrt()
    torch.testing.assert_close(layer.pst_in_scale, rms / rms.mean(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        w = layer.effective_weight()
        expect = (
            w.abs() * layer.pst_in_scale
            + layer.pst_A @ layer.pst_B
            + layer.pst_R[:, None]
            + layer.pst_C[None, :]
        )
        torch.testing.assert_close(layer.scores(w), expect)
    state = a.state_dict()
    assert f"{name}.pst_in_scale" in state and f"{name}.pst_in_sq" in state
    run_schedule(a, 5, data=data)
    a.model.eval()
    expected = a.model(**data).logits
    b = make(sparsity=0.5, score_prior="wanda")
    b.load_state_dict(a.state_dict())
    b.model.eval()
    torch.testing.assert_close(b.model(**data).logits, expected, atol=1e-6, rtol=0)
    # the prior changes which weights are pruned (the statistics of a real input are not uniform)
    with torch.no_grad():
        w = layer.effective_weight()
        assert not torch.equal(topk_mask(w.abs(), 0.5), topk_mask(w.abs() * layer.pst_in_scale, 0.5))


# extension: nm_schedule=gradual (N:M-constrained pruning during the ramp: no jump into the cool-down)
def test_nm_topk_mask_prunes_p_entries_within_the_nm_pattern():
    from slimtune.methods.pst.layer import nm_topk_mask

    g = torch.Generator().manual_seed(0)
    s = torch.randn(24, 32, generator=g)
    for sp in (0.0, 0.1, 0.29, 0.45, 0.5):
        keep = nm_topk_mask(s, sp, 2, 4)
        assert int((~keep).sum()) == n_pruned(s.numel(), sp)
        assert int((~keep).view(24, 8, 4).sum(-1).max()) <= 2
    assert torch.equal(nm_topk_mask(s, 0.5, 2, 4), nm_mask(s, 2, 4))
    # ties: every group gives up its lowest entry before any group gives up a second one
    const = torch.zeros(4, 8)
    keep = nm_topk_mask(const, 0.25, 2, 4)
    assert int((~keep).sum()) == 8 and int((~keep).view(4, 2, 4).sum(-1).max()) == 1


def test_gradual_nm_schedule_stays_in_pattern_and_ends_equal_to_the_export():
    a = make(sparsity=0.5, pattern="2:4", nm_schedule="gradual")
    _, zeros = run_schedule(a, 20)
    layers = pst_layers(a.model)
    expected = sum(n_pruned(m.base_layer.weight.numel(), 0.5) for m in layers.values())
    assert zeros[-1] == expected and all(x <= y for x, y in zip(zeros, zeros[1:]))
    for layer in layers.values():
        k = layer.keep_mask()
        assert torch.equal(k.view(k.shape[0], -1, 4).sum(-1), torch.full((k.shape[0], k.shape[1] // 4), 2))
    data = batch(seed=5)
    a.model.eval()
    torch.testing.assert_close(a.merge().eval()(**data).logits, a.model(**data).logits, atol=1e-5, rtol=0)


# extension: scope=row (each output row ranked on its own, Wanda's per-output comparison group)
def test_row_topk_mask_prunes_exactly_p_spread_over_rows():
    from slimtune.methods.pst.layer import row_topk_mask

    g = torch.Generator().manual_seed(0)
    for rows, cols, sp in ((16, 24, 0.5), (7, 10, 0.29), (5, 3, 0.5), (9, 13, 0.9), (4, 4, 0.0)):
        s = torch.randn(rows, cols, generator=g).round(decimals=1)  # ties
        keep = row_topk_mask(s, sp)
        assert torch.equal(keep, row_topk_mask(s.clone(), sp))
        per_row = (~keep).sum(1)
        assert int(per_row.sum()) == n_pruned(rows * cols, sp)
        assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.min()) == min(
            n_pruned(cols, sp), n_pruned(rows * cols, sp) // rows
        )
        # reference: stable sort of each row, the first floor(k·s) go; left-overs by (next value, row)
        order = torch.sort(s, dim=-1, stable=True).indices
        per = int(per_row.min())
        ref = torch.ones_like(keep).scatter_(-1, order[:, :per], False)
        left = n_pruned(rows * cols, sp) - rows * per
        if left:
            nxt = s.gather(-1, order[:, per : per + 1]).squeeze(-1)
            for r in sorted(range(rows), key=lambda r: (float(nxt[r]), r))[:left]:
                ref[r, order[r, per]] = False
        assert torch.equal(keep, ref)
    # ties: lower column first; the left-over entries go to the lowest rows in order
    keep = row_topk_mask(torch.zeros(4, 6), 0.3)  # p = 7: one per row, then 3 more
    assert (~keep).int().tolist() == [[1, 1, 0, 0, 0, 0]] * 3 + [[1, 0, 0, 0, 0, 0]]


def test_row_scope_schedule_ends_at_the_per_row_count_and_is_checked():
    a = make(sparsity=0.5, scope="row", score_prior="wanda")
    run_schedule(a, 20)
    for name, layer in pst_layers(a.model).items():
        keep = layer.keep_mask()
        n, k = keep.shape
        assert int((~keep).sum()) == n_pruned(n * k, 0.5), name
        assert torch.equal((~keep).sum(1), torch.full((n,), k // 2)), name
    with pytest.raises(ConfigError, match="scope: 'row' applies to unstructured"):
        make_config("pst", scope="row", pattern="2:4")
    with pytest.raises(ConfigError, match="scope: 'global' is not one of local, row"):
        make_config("pst", scope="global")


# extension: distillation from the unmasked network over the context positions
def test_context_positions_are_the_prompt_predictions_without_padding():
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, 7, 8]])
    sel = context_positions(attn, labels)
    # position t predicts token t+1: context while token t+1 is real and not a target
    assert sel.tolist() == [
        [True, True, False, False, False, False],
        [True, False, False, False, False, False],
    ]


@pytest.mark.parametrize("source", ["base", "dense"])
def test_distillation_adds_gamma_times_the_kl_to_the_unmasked_teacher(source):
    gamma, temp = 0.7, 2.0
    a = make(sparsity=0.5, distill_weight=gamma, distill_from=source, distill_temperature=temp)
    plain = make(sparsity=0.5)
    run_schedule(a, 6)  # pruned to 50% with trained U, V (labels = inputs: no context, no distillation yet)
    plain.load_state_dict(a.state_dict())
    set_sparsity(plain.model, 0.5, None)
    data = batch()
    data["labels"][:, :7] = -100
    a.model.train()
    plain.model.train()
    out, ref = a.model(**data), plain.model(**data)
    assert torch.allclose(out.logits, ref.logits)
    # the teacher by hand: the same layers' base or W0 + βUV weights, no mask
    teacher = copy.deepcopy(plain.model)
    for name, layer in pst_layers(teacher).items():
        w = layer.base_layer.weight if source == "base" else layer.effective_weight()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w.detach())
        teacher.set_submodule(name, lin)
    with torch.no_grad():
        t_logits = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    sel = context_positions(data["attention_mask"], data["labels"])
    assert int(sel.sum()) == 2 * 6
    p_t = torch.softmax(t_logits[sel] / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(ref.logits[sel] / temp, -1))).sum(-1).mean() * temp**2
    assert float(kl.detach()) > 1e-4  # the pruned model really differs from its teacher
    assert torch.allclose(out.loss, ref.loss + gamma * kl, rtol=1e-5, atol=1e-6)
    assert a.extra_state["distill_kl"] == pytest.approx(float(kl.detach()), abs=2e-6)
    # the gradient is the student's: the teacher pass holds no graph and leaves the masks in place
    out.loss.backward()
    (ref.loss + gamma * kl).backward()
    for (n, p), (_, q) in zip(a.named_trainable_parameters(), plain.named_trainable_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    assert all(layer.teacher is None for layer in pst_layers(a.model).values())
    a.model.eval()
    assert float(a.model(**data).loss) == pytest.approx(float(ref.loss), rel=1e-6)  # eval: the task loss only


def test_distillation_options_are_checked_by_key():
    with pytest.raises(ConfigError, match="distill_weight: -0.1 must be >= 0"):
        make_config("pst", distill_weight=-0.1)
    with pytest.raises(ConfigError, match="distill_from: 'teacher' is not one of base, dense"):
        make_config("pst", distill_from="teacher")
    with pytest.raises(ConfigError, match="distill_temperature: 0 must be > 0"):
        make_config("pst", distill_temperature=0)
