"""``train.optimizer_in_backward``: AdamW steps each parameter inside backward (slimtune/training/in_backward.py).

The trained state must equal the ordinary step's bit for bit (it is the same per-tensor update), no two
gradients may exist at once, and what it cannot do is refused with one line."""

from __future__ import annotations

import math

import pytest
import torch

from slimtune.capabilities import probes as caps
from slimtune.core.errors import ConfigError, UserError
from slimtune.training.config import from_dict
from slimtune.training.faults import RunStopped
from slimtune.training.in_backward import StepInBackward


@pytest.mark.parametrize(
    "method,family",
    [("full", "llama"), ("full", "mistral"), ("full", "qwen2"), ("lora", "llama"), ("qlora", "llama")],
)
def test_the_trained_state_equals_the_ordinary_step(method, family):
    """Tied (llama, qwen2) and untied (mistral) heads; weight decay on, so both parameter groups step."""
    data, lr = caps.batch(), caps.SETTINGS[method][1]
    ordinary, inside = caps.adapt(method, family), caps.adapt(method, family)
    assert torch.equal(ordinary.model.lm_head.weight, inside.model.lm_head.weight)
    want = caps.train(ordinary, 3, lr, data, weight_decay=0.1)
    got = caps.train(inside, 3, lr, data, weight_decay=0.1, optimizer_in_backward=True)
    assert got == want
    a, b = caps._state(ordinary), caps._state(inside)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(a[k], caps._state(caps.adapt(method, family))[k]) for k in a)  # it trained


def test_no_two_gradients_exist_at_once():
    a = caps.adapt("full", "llama")
    trainer = caps.trainer_for(a, 2, 1e-3, caps.batch(), optimizer_in_backward=True)
    params = a.trainable_parameters()
    raw = trainer.in_backward.optimizer
    alive, real_step = [], raw.step

    def step(*args, **kwargs):
        alive.append(sum(p.grad is not None for p in params))
        return real_step(*args, **kwargs)

    raw.step = step
    trainer.model.train()
    for _ in range(2):
        trainer.train_step()
        assert all(p.grad is None for p in params)
    # one step per parameter per backward, each with only that parameter's gradient formed
    assert alive == [1] * (2 * len(params))
    assert trainer.in_backward.stepped == len(params)


@pytest.mark.parametrize(
    "train,message",
    [
        (
            {"max_grad_norm": 1.0},
            "train.optimizer_in_backward: needs max_grad_norm: null (it is 1.0)",
        ),
        (
            {"max_grad_norm": None, "grad_accum": 2},
            "train.optimizer_in_backward: needs grad_accum: 1 (it is 2)",
        ),
    ],
)
def test_clipping_and_accumulation_are_refused_by_the_config(train, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"train": {"optimizer_in_backward": True, **train}, "method": {"name": "full"}})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(message)


@pytest.mark.parametrize(
    "method,hook", [("sat", "after_backward, optimizer_step"), ("meft", "after_backward")]
)
def test_methods_that_work_on_the_gradients_are_refused(method, hook):
    with pytest.raises(UserError, match=f"method '{method}' works on the gradients .*{hook}"):
        caps.trainer_for(caps.adapt(method, "llama"), 1, 1e-3, caps.batch(), optimizer_in_backward=True)


def test_several_processes_are_refused(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(UserError, match="train.optimizer_in_backward: not built for a 2-process run"):
        caps.trainer_for(caps.adapt("full", "llama"), 1, 1e-3, caps.batch(), optimizer_in_backward=True)


def test_a_nonfinite_loss_is_skipped_before_anything_steps():
    a = caps.adapt("full", "llama")
    before = caps._state(a)
    trainer = caps.trainer_for(a, 1, 1e-3, caps.batch(), optimizer_in_backward=True)
    real = trainer.loss
    trainer.loss = lambda batch: real(batch) * math.inf
    trainer.model.train()
    loss, _, _ = trainer.train_step()
    assert not math.isfinite(loss) and trainer.skipped == 1 and trainer.in_backward.stepped == 0
    assert caps._same_state(before, caps._state(a), 0.0)


def test_a_nonfinite_gradient_stops_the_run_without_saving(tmp_path):
    a = caps.adapt("full", "llama")
    layer = a.model.model.layers[0].mlp.down_proj.weight  # formed late in backward: most have stepped
    layer.register_hook(lambda g: g * math.inf)
    trainer = caps.trainer_for(a, 1, 1e-3, caps.batch(), run_dir=tmp_path, optimizer_in_backward=True)
    trainer.model.train()
    with pytest.raises(RunStopped, match=r"non-finite gradient of model\.layers\.0\.mlp\.down_proj\.weight; "
                       r"stopped \(train\.optimizer_in_backward: \d+ parameters had already stepped"):  # fmt: skip
        trainer.train_step()
    assert 0 < trainer.in_backward.stepped < len(a.trainable_parameters())
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_from_the_first_nonfinite_gradient_on_nothing_steps(fused, bad):
    """Backward forms the last layer's gradient first: with layer 1's poisoned, layers 2 and 1 (in that order)
    and everything after (layer 0) must keep their weights and AdamW step counts; the fused AdamW gets the flag
    as its found_inf (no host read per parameter), the other one reads it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    named = list(net.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], lr=0.1, fused=fused)
    hooks = StepInBackward(opt, named)
    x = torch.randn(2, 4)
    net(x).sum().backward()  # a clean step first: every parameter has AdamW state
    assert hooks.fault is None and hooks.stepped == len(named)
    before = {n: p.detach().clone() for n, p in named}
    net[1].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), bad))
    hooks.start()
    net(x).sum().backward()
    order = [n for n, _ in hooks._seen]
    assert order[:2] == ["2.weight", "2.bias"] or order[:2] == ["2.bias", "2.weight"]
    assert hooks.fault == "gradient of 1.weight"
    stepped = set(order[: hooks.stepped])
    assert stepped == {"2.weight", "2.bias"} | (
        {"1.bias"} if order.index("1.bias") < order.index("1.weight") else set()
    )
    for n, p in named:
        assert torch.equal(p, before[n]) != (n in stepped), n
        assert int(opt.state[p]["step"]) == (2 if n in stepped else 1), n
    assert all(p.grad is None for _, p in named) and not hasattr(opt, "found_inf")


def test_first_nonfinite_grad_names_the_first_one():
    from slimtune.methods.base import first_nonfinite_grad

    ps = [torch.nn.Parameter(torch.zeros(0 if i == 0 else 3)) for i in range(4)]  # p0: an empty FSDP shard
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    for p in ps:
        p.grad = torch.ones_like(p)
    assert first_nonfinite_grad(iter(named)) is None
    ps[3].grad[1] = -math.inf
    assert first_nonfinite_grad(iter(named)) == "p3"
    ps[2].grad[0] = math.nan
    assert first_nonfinite_grad(iter(named)) == "p2"
    ps[1].data, ps[1].grad = ps[1].data.bfloat16(), torch.full((3,), math.inf, dtype=torch.bfloat16)
    assert first_nonfinite_grad(iter(named)) == "p1"
