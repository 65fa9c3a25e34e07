"""SAT (sparsity-accelerated training): the acceptance checks of docs/methods/sat.md on a tiny Llama
(hidden 64, FFN 128, 4 query heads in 2 KV groups, 2 layers)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slimtune.core.errors import ConfigError
from slimtune.methods import apply, make_config
from slimtune.methods.sat.apply import remove_sat, sat_modules
from slimtune.methods.sat.config import OmissionSchedule
from slimtune.methods.sat.selection import choose, n_kept
from slimtune.models.loading import tiny_llama
from slimtune.modules import activations


def make(**kw):
    kw = {"schedule": "constant", **kw}
    return apply(tiny_llama(seed=0), make_config("sat", **kw))


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding in the second row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fwd_bwd(model, data):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**data)
    out.loss.backward()
    return out


# 1. rate 0 is bit-identical to the unpatched model; all-kept slicing equals dense
def test_rate_zero_is_bit_identical_to_unpatched_model():
    ref = tiny_llama(seed=0)
    a = make(rate=0.0)
    data = padded_batch()
    o_ref, o_sat = fwd_bwd(ref, data), fwd_bwd(a.model, data)
    assert torch.equal(o_ref.logits, o_sat.logits) and torch.equal(o_ref.loss, o_sat.loss)
    g_ref, g_sat = grads(ref), grads(a.model)
    assert g_ref.keys() == g_sat.keys() and len(g_ref) > 0
    assert all(torch.equal(g_ref[n], g_sat[n]) for n in g_ref)


def test_sliced_path_with_every_neuron_kept_matches_dense():
    ref = tiny_llama(seed=0)
    a = make(rate=0.5)
    for layer, kind, _ in sat_modules(a.model):
        a.controller.forced[(layer, kind)] = torch.arange(128 if kind == "mlp" else 4)
    data = padded_batch()
    o_ref, o_sat = fwd_bwd(ref, data), fwd_bwd(a.model, data)
    torch.testing.assert_close(o_sat.logits, o_ref.logits, atol=1e-6, rtol=0)
    g_ref, g_sat = grads(ref), grads(a.model)
    for n in g_ref:
        torch.testing.assert_close(g_sat[n], g_ref[n], atol=1e-6, rtol=1e-5, msg=n)


# 2 + 4. fixed kept sets: equal to a dense model with the omitted activations zeroed; omitted get exactly 0 grad
KEPT_MLP = torch.tensor([0, 3, 5, 17, 40, 64, 99, 127])
KEPT_HEADS = torch.tensor([0, 1])  # both heads of KV group 0: group 1's k/v rows are unused


def kept_input_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """1/0 over the inputs of down_proj (MLP channels) and o_proj (head columns) for KEPT_MLP / KEPT_HEADS."""
    mlp_mask = torch.zeros(128)
    mlp_mask[KEPT_MLP] = 1
    head_mask = torch.zeros(4, 16)
    head_mask[KEPT_HEADS] = 1
    return mlp_mask, head_mask.flatten()


def masked_reference():
    """Dense tiny Llama whose omitted MLP channels and head outputs are zeroed before down_proj / o_proj."""
    ref = tiny_llama(seed=0)
    mlp_mask, head_mask = kept_input_masks()
    for layer in ref.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * mlp_mask,))
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] * head_mask,))
    return ref


def forced_sat():
    a = make(rate=0.5)
    for layer in range(2):
        a.controller.forced[(layer, "mlp")] = KEPT_MLP
        a.controller.forced[(layer, "attn")] = KEPT_HEADS
    return a


def test_kept_neurons_match_masked_dense_reference_and_omitted_get_zero_gradient():
    ref, a = masked_reference(), forced_sat()
    data = padded_batch()
    o_ref, o_sat = fwd_bwd(ref, data), fwd_bwd(a.model, data)
    torch.testing.assert_close(o_sat.logits, o_ref.logits, atol=1e-5, rtol=1e-5)
    g_ref = grads(ref)
    omitted_mlp = torch.ones(128, dtype=torch.bool)
    omitted_mlp[KEPT_MLP] = False
    for i, layer in enumerate(a.model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        for name, g in grads(layer).items():
            torch.testing.assert_close(g, g_ref[f"model.layers.{i}.{name}"], atol=1e-5, rtol=1e-4, msg=name)
        assert mlp.gate_proj.weight.grad[omitted_mlp].abs().max() == 0
        assert mlp.up_proj.weight.grad[omitted_mlp].abs().max() == 0
        assert mlp.down_proj.weight.grad[:, omitted_mlp].abs().max() == 0
        assert mlp.gate_proj.weight.grad[KEPT_MLP].abs().sum(1).min() > 0
        assert attn.q_proj.weight.grad[32:].abs().max() == 0  # heads 2, 3
        assert attn.o_proj.weight.grad[:, 32:].abs().max() == 0
        assert attn.k_proj.weight.grad[16:].abs().max() == 0  # KV group 1
        assert attn.v_proj.weight.grad[16:].abs().max() == 0
        assert attn.q_proj.weight.grad[:32].abs().sum(1).min() > 0
        assert attn.k_proj.weight.grad[:16].abs().sum(1).min() > 0


# 4. compute really drops: FLOPs fall by exactly the omitted GEMM work
def count_flops(model, data):
    with FlopCounterMode(display=False) as fc:
        fwd_bwd(model, data)
    return fc.get_total_flops()


def test_flops_fall_by_the_omitted_share():
    data = padded_batch()
    n_tok, d, f, hd, layers = data["input_ids"].numel(), 64, 128, 16, 2
    dense = count_flops(tiny_llama(seed=0), data)
    # every GEMM is counted forward + input-gradient + weight-gradient = 3 x 2 N d_in d_out
    gemm = lambda d_in, d_out: 3 * 2 * n_tok * d_in * d_out  # noqa: E731
    a = make(rate=0.5, metric="wanda", selection="sampling")
    sparse = count_flops(a.model, data)
    saved = 0
    for (_layer, kind), kept in a.controller.cache.items():
        if kind == "mlp":
            saved += 3 * gemm(d, f - kept.numel())
        else:
            kv_kept = torch.unique(kept // 2).numel()
            saved += 2 * gemm(d, (4 - kept.numel()) * hd) + 2 * gemm(d, (2 - kv_kept) * hd)
    assert len(a.controller.cache) == 2 * layers
    assert sparse == dense - saved
    mlp_share = layers * 3 * gemm(d, f) / dense
    assert saved / dense >= 0.5 * mlp_share  # at least half the MLP work is gone at rate 0.5


# 5. importance and selection
def test_selection_counts_uniqueness_determinism_and_score_preference():
    assert [n_kept(9, r, 1) for r in (0.0, 0.25, 0.5, 0.9, 0.99)] == [9, 7, 5, 1, 1]
    assert n_kept(1536, 0.5, 1) == 768
    scores = torch.linspace(0.01, 1.0, 50)
    counts = torch.zeros(50)
    for s in range(300):
        idx = choose(scores, 10, "sampling", torch.Generator().manual_seed(s))
        assert idx.numel() == 10 and torch.equal(idx, idx.unique()) and torch.equal(idx, idx.sort().values)
        counts[idx] += 1
    again = choose(scores, 10, "sampling", torch.Generator().manual_seed(7))
    assert torch.equal(again, choose(scores, 10, "sampling", torch.Generator().manual_seed(7)))
    assert counts[40:].sum() > 3 * counts[:10].sum() and counts[:10].sum() > 0  # likelier, yet never starved
    top = choose(scores, 10, "topk", torch.Generator())
    assert torch.equal(top, torch.arange(40, 50))


@pytest.mark.parametrize("metric", ["uniform", "magnitude", "wanda", "maxip", "activation"])
def test_every_metric_runs_and_selection_changes_across_micro_batches(metric):
    # input-agnostic scores (uniform, magnitude) vary only through sampling; the others through the data too
    a = make(rate=0.5, metric=metric, selection="sampling" if metric in ("uniform", "magnitude") else "topk")
    seen = []
    for seed in range(3):
        fwd_bwd(a.model, padded_batch(seed))
        seen.append(a.controller.cache[(0, "mlp")].clone())
    assert all(s.numel() == 64 for s in seen)
    assert not all(torch.equal(seen[0], s) for s in seen[1:])


def test_wanda_scores_ignore_padding_tokens():
    from slimtune.methods.sat.selection import mlp_scores

    mlp = tiny_llama(seed=0).model.layers[0].mlp
    x = torch.randn(2, 6, 64)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    garbage = x.clone()
    garbage[1, 3:] = 1e3  # padding positions must not matter
    torch.testing.assert_close(mlp_scores(mlp, x, mask, "wanda"), mlp_scores(mlp, garbage, mask, "wanda"))
    assert not torch.allclose(mlp_scores(mlp, x, None, "wanda"), mlp_scores(mlp, garbage, None, "wanda"))


# 6. the ladder
def test_ladder_schedule_values_at_and_around_breakpoints():
    s = OmissionSchedule.ladder(0.5, sparse_frac=0.5, n_rungs=1, dense_frac=0.2)
    assert s.rungs == ((0.0, 0.5), (0.5, 0.25), (0.8, 0.0))
    n = 100
    rates = [s.rate(t, n) for t in range(n)]
    assert rates[0] == rates[49] == 0.5 and rates[50] == rates[79] == 0.25 and rates[80] == rates[99] == 0.0
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert s.rate(5, None) == 0.5  # unknown length (benchmarks): held at the first rung
    three = OmissionSchedule.ladder(0.6, 0.4, 3, 0.1)
    assert [r for _, r in three.rungs] == pytest.approx([0.6, 0.45, 0.3, 0.15, 0.0])
    assert three.expected_compute(1.0) == pytest.approx(0.4 * 0.4 + 0.5 / 3 * (0.55 + 0.7 + 0.85) + 0.1)
    with pytest.raises(ValueError, match="must not increase"):
        OmissionSchedule.from_rungs([[0, 0.2], [0.5, 0.4]])
    with pytest.raises(ConfigError, match="rungs: the first rung must start at progress 0"):
        make_config("sat", schedule="custom", rungs=[[0.1, 0.5]])


def test_trainer_hooks_follow_the_ladder_and_the_last_phase_is_dense():
    a = apply(tiny_llama(seed=0), make_config("sat", rate=0.5))  # ladder 0.5 / 0.25 / 0
    a.total_steps = 10
    seen = []
    for step in range(10):
        a.on_step_start(step)
        out = fwd_bwd(a.model, padded_batch(step))
        seen.append((a.extra_state["omission_rate"], len(a.controller.cache)))
        assert out.loss.isfinite()
    assert [r for r, _ in seen] == [0.5] * 5 + [0.25] * 3 + [0.0] * 2
    assert all(c == 4 for _, c in seen[:8]) and all(c == 0 for _, c in seen[8:])  # dense: no selection at all


# 8. eval dense, removal, state dict unchanged
def test_eval_is_dense_removal_restores_and_state_dict_is_unchanged():
    ref = tiny_llama(seed=0).eval()
    a = make(rate=0.5)
    data = padded_batch()
    assert torch.equal(a.model.eval()(**data).logits, ref(**data).logits)
    assert {k: v.shape for k, v in a.model.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    remove_sat(a.model)
    # no forward of SAT's is left; the norms keep the checkpointed one every method's model gets (activations.py)
    left = {
        getattr(m.__dict__["forward"], "__func__", None) for m in a.model.modules() if "forward" in m.__dict__
    }
    assert left <= {activations._checkpointed_norm}
    assert torch.equal(fwd_bwd(a.model, data).logits, fwd_bwd(tiny_llama(seed=0), data).logits)


# gradient accumulation and activation checkpointing
def test_accumulated_micro_batches_select_independently():
    a = make(rate=0.5, metric="uniform", selection="sampling")
    a.controller.start_step(0, None)
    kept = []
    for seed in range(2):
        a.model.train()(**padded_batch(seed)).loss.backward()
        kept.append(a.controller.cache[(1, "mlp")].clone())
    union = a.controller.union[(1, "mlp")]
    assert not torch.equal(kept[0], kept[1]) and int(union.sum()) > 64
    g = a.model.model.layers[1].mlp.gate_proj.weight.grad
    assert torch.equal(g.abs().sum(1) > 0, union)  # exactly the rows kept in some micro-batch have gradient


@pytest.mark.parametrize("kw", [{}, {"metric": "wanda", "selection": "sampling"}])
def test_gradient_checkpointing_recomputes_with_the_same_kept_sets(kw):
    data = padded_batch()
    plain = make(rate=0.5, **kw)
    fwd_bwd(plain.model, data)
    ckpt = make(rate=0.5, **kw)
    ckpt.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fwd_bwd(ckpt.model, data)
    for key, kept in plain.controller.cache.items():
        assert torch.equal(kept, ckpt.controller.cache[key])
    g1, g2 = grads(plain.model), grads(ckpt.model)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


def test_freeze_omitted_keeps_omitted_rows_through_adamw():
    def run(mask):
        a = make(rate=0.5, metric="uniform", selection="sampling", optimizer_mask=mask)
        opt = torch.optim.AdamW(a.trainable_parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(2):
            a.on_step_start(step)
            before = a.model.model.layers[0].mlp.gate_proj.weight.detach().clone()
            fwd_bwd(a.model, padded_batch(step))
            a.after_backward(step)
            opt.step()
            a.optimizer_step(opt)
        omitted = ~a.controller.union[(0, "mlp")]
        after = a.model.model.layers[0].mlp.gate_proj.weight.detach()
        return torch.equal(after[omitted], before[omitted]), torch.equal(after[~omitted], before[~omitted])

    assert run("freeze_omitted") == (True, False)
    assert run("none") == (False, False)  # plain AdamW moves zero-gradient rows (momentum and decay)


def test_sat_lora_slices_the_lora_factors_too():
    a = make(rate=0.5, lora_r=4)
    fwd_bwd(a.model, padded_batch())
    trainable = [n for n, p in a.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    (layer0_mlp_key,) = [k for k in a.controller.cache if k == (0, "mlp")]
    kept = a.controller.cache[layer0_mlp_key]
    omitted = torch.ones(128, dtype=torch.bool)
    omitted[kept] = False
    mlp = a.model.base_model.model.model.layers[0].mlp
    a.model.zero_grad()
    with torch.no_grad():  # make B non-zero so A receives gradient
        for m in (mlp.gate_proj, mlp.down_proj):
            m.lora_B["default"].weight.normal_()
    a.controller.forced[(0, "mlp")] = kept
    fwd_bwd(a.model, padded_batch())
    assert mlp.gate_proj.lora_B["default"].weight.grad[omitted].abs().max() == 0
    assert mlp.down_proj.lora_A["default"].weight.grad[:, omitted].abs().max() == 0
    assert mlp.gate_proj.lora_B["default"].weight.grad[kept].abs().sum() > 0


def test_bad_sat_configs_are_reported_by_key():
    with pytest.raises(ConfigError) as e:
        make_config("sat", rate=1.0, metric="random", targets=["ffn"], sparse_frac=0.9, dense_frac=0.2)
    msg = str(e.value)
    for key in ("rate", "metric", "targets", "dense_frac"):
        assert key in msg


def test_flop_shares_reproduce_the_spec_table_and_limits():
    from transformers import LlamaConfig

    from slimtune.methods.sat.selection import flop_shares, speed_limit

    smol = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=30, vocab_size=49152, head_dim=64,
    )  # fmt: skip
    shares = flop_shares(smol, 256)
    expected = {"mlp": 55.6, "q_o": 13.9, "k_v": 4.6, "attn_scores": 6.2, "lm_head": 19.8}
    assert {k: round(100 * v, 1) for k, v in shares.items()} == expected
    llama7b = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=32, vocab_size=32000,
    )  # fmt: skip
    big = {k: round(100 * v, 1) for k, v in flop_shares(llama7b, 4096).items()}
    assert big == {"mlp": 56.4, "q_o": 14.0, "k_v": 14.0, "attn_scores": 14.0, "lm_head": 1.7}
    assert speed_limit(smol, 256, 0.5, ["mlp"])["flop_speed_limit"] == pytest.approx(1.385, abs=1e-3)
    both = speed_limit(smol, 256, 0.5, ["mlp", "attn"])  # 4 of 9 heads: 44% of the heads, not 50%
    assert both["omitted_heads"] == pytest.approx(4 / 9) and both["flop_speed_limit"] == pytest.approx(
        1.58, abs=5e-3
    )


def test_activation_metric_reuses_dense_values_with_exact_gradients():
    data = padded_batch()
    a = make(rate=0.5, metric="activation", selection="topk")
    out_a = fwd_bwd(a.model, data)
    b = make(rate=0.5, metric="activation", selection="topk")
    b.controller.forced = dict(a.controller.cache)  # same kept sets, computed by plain slicing (no reuse)
    out_b = fwd_bwd(b.model, data)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-6, rtol=1e-6)
    ga, gb = grads(a.model), grads(b.model)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5, msg=n)
    # the oracle keeps the channels with the largest summed |silu(g) * u| on the batch's real tokens
    ref = tiny_llama(seed=0)
    mlp, seen = ref.model.layers[0].mlp, []
    mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    ref(**data)
    with torch.no_grad():
        act = (mlp.act_fn(mlp.gate_proj(seen[0])) * mlp.up_proj(seen[0]))[data["attention_mask"].bool()]
    act = act.abs().sum(0)
    c = make(
        rate=0.5, metric="activation", selection="topk", targets=["mlp"]
    )  # dense attention: same MLP input
    fwd_bwd(c.model, data)
    assert torch.equal(c.controller.cache[(0, "mlp")], act.topk(64).indices.sort().values)


# extension: omit=backward (dense forward, the omitted neurons only skipped in the backward pass)
def detached_omission_reference():
    """Dense tiny Llama whose omitted MLP channels / heads add their output with the gradient cut."""
    ref = tiny_llama(seed=0)
    mlp_mask, head_mask = kept_input_masks()

    def split(mask):
        def hook(m, args, out):
            x = args[0]
            return (
                torch.nn.functional.linear(x * mask, m.weight)
                + torch.nn.functional.linear(x * (1 - mask), m.weight).detach()
            )

        return hook

    for layer in ref.model.layers:
        layer.mlp.down_proj.register_forward_hook(split(mlp_mask))
        layer.self_attn.o_proj.register_forward_hook(split(head_mask))
    return ref


def test_omit_backward_keeps_the_dense_forward_and_cuts_only_the_omitted_gradients():
    dense, ref = tiny_llama(seed=0), detached_omission_reference()
    a = make(rate=0.5, omit="backward")
    for layer in range(2):
        a.controller.forced[(layer, "mlp")] = KEPT_MLP
        a.controller.forced[(layer, "attn")] = KEPT_HEADS
    data = padded_batch()
    o_dense, o_ref, o_sat = fwd_bwd(dense, data), fwd_bwd(ref, data), fwd_bwd(a.model, data)
    torch.testing.assert_close(
        o_ref.logits, o_dense.logits, atol=1e-5, rtol=1e-5
    )  # the reference is dense too
    torch.testing.assert_close(o_sat.logits, o_dense.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_sat.loss, o_dense.loss, atol=1e-6, rtol=1e-6)
    g_ref, g_sat = grads(ref), grads(a.model)
    assert g_ref.keys() == g_sat.keys()
    for n in g_ref:
        torch.testing.assert_close(g_sat[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    g_dense = grads(dense)
    assert not torch.allclose(
        g_sat["model.layers.0.mlp.gate_proj.weight"], g_dense["model.layers.0.mlp.gate_proj.weight"]
    )
    omitted = torch.ones(128, dtype=torch.bool)
    omitted[KEPT_MLP] = False
    for layer in a.model.model.layers:
        assert layer.mlp.gate_proj.weight.grad[omitted].abs().max() == 0
        assert layer.mlp.down_proj.weight.grad[:, omitted].abs().max() == 0
        assert layer.self_attn.q_proj.weight.grad[32:].abs().max() == 0
        assert layer.self_attn.o_proj.weight.grad[:, 32:].abs().max() == 0


@pytest.mark.parametrize("metric", ["activation", "wanda"])
def test_omit_backward_with_a_scoring_metric_gives_the_dense_loss(metric):
    dense = tiny_llama(seed=0)
    a = make(rate=0.5, omit="backward", metric=metric, selection="topk")
    data = padded_batch()
    o_dense, o_sat = fwd_bwd(dense, data), fwd_bwd(a.model, data)
    torch.testing.assert_close(o_sat.logits, o_dense.logits, atol=1e-5, rtol=1e-5)
    kept = a.controller.cache[(0, "mlp")]
    assert len(kept) == 64
    omitted = torch.ones(128, dtype=torch.bool)
    omitted[kept] = False
    assert a.model.model.layers[0].mlp.up_proj.weight.grad[omitted].abs().max() == 0


def test_dense_label_tokens_run_the_whole_mlp_at_answer_positions():
    from slimtune.methods.sat.layer import mlp_forward

    data = padded_batch()
    data["labels"][:, :9] = -100  # only the last positions are answers
    a = make(rate=0.5, targets=["mlp"], dense_tokens="labels", metric="activation", selection="topk")
    seen = {}
    mlp0 = a.model.model.layers[0].mlp

    def keep_first(m, args, out):
        seen.setdefault("io", (args[0].detach(), out.detach()))

    mlp0.register_forward_hook(keep_first)
    out = fwd_bwd(a.model, data)
    dense_pos = a.controller.dense_positions
    expect = torch.zeros_like(dense_pos)
    expect[:, :-1] = data["labels"][:, 1:] != -100
    assert torch.equal(dense_pos, expect) and 0 < dense_pos.sum() < dense_pos.numel()
    x, y = seen["io"]
    with torch.no_grad():
        y_dense = type(mlp0).forward(mlp0, x)
        y_sliced = mlp_forward(mlp0, x, a.controller.cache[(0, "mlp")])
    torch.testing.assert_close(y[dense_pos], y_dense[dense_pos], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y[~dense_pos], y_sliced[~dense_pos], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y[~dense_pos], y_dense[~dense_pos])
    assert out.loss.isfinite()


def test_layer_scale_sets_per_layer_rates_and_zero_keeps_a_layer_dense():
    a = make(rate=0.5, targets=["mlp"], layer_scale={0: 0.0, 1: 1.5}, metric="magnitude", selection="topk")
    fwd_bwd(a.model, padded_batch())
    assert (0, "mlp") not in a.controller.cache  # layer 0 ran its own dense forward
    assert len(a.controller.cache[(1, "mlp")]) == 128 - 96  # rate 0.75
    g = a.model.model.layers[0].mlp.gate_proj.weight.grad
    assert g.abs().sum(1).min() > 0
