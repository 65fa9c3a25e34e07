"""The shared contract every method passes. A new method joins by adding one row to CASES."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from slimtune.capabilities import probes as caps
from slimtune.core.errors import ConfigError
from slimtune.core.schema import positive
from slimtune.methods import METHODS, Adapted, MethodConfig, apply, make_config
from slimtune.models.loading import tiny_llama
from slimtune.modules.quant.backbone import bnb_works, quantize_decoder
from tests.conftest import batch

BNB = bnb_works(torch.device("cpu"))

# (id, method name, config kwargs, learning rate for the "loss falls" check, merges into a plain model)
CASES = [
    ("full", "full", {}, 1e-3, True),
    ("lora", "lora", {"r": 4, "dropout": 0.0}, 5e-3, True),
    ("qlora-torch", "qlora", {"r": 4, "dropout": 0.0, "backend": "torch"}, 5e-3, True),
    pytest.param(
        "qlora-bnb",
        "qlora",
        {"r": 4, "dropout": 0.0, "backend": "bitsandbytes"},
        5e-3,
        True,
        marks=pytest.mark.skipif(not BNB, reason="bitsandbytes 4-bit not usable here"),
    ),
    ("qst", "qst", {"r": 4, "dropout": 0.0, "backend": "torch"}, 3e-2, False),
    ("sat", "sat", {"rate": 0.5, "schedule": "constant"}, 1e-3, True),
    ("sat-lora", "sat", {"rate": 0.5, "schedule": "constant", "lora_r": 4, "selection": "topk"}, 5e-3, True),
    ("pst", "pst", {"sparsity": 0.5}, 3e-3, True),
    ("pst-2:4", "pst", {"sparsity": 0.5, "pattern": "2:4", "init": "kaiming"}, 1e-2, True),
    ("meft", "meft", {"r": 256, "k": 16, "experts": 16, "n_probe": 4}, 1e-2, False),
]


def make(name, kwargs, seed=0):
    torch.manual_seed(123)
    return apply(tiny_llama(seed=seed), make_config(name, **kwargs))


def reference_model(name, kwargs):
    """What the adapted model must equal at initialisation."""
    base = tiny_llama(seed=0)
    if name in ("qlora", "qst"):
        quantize_decoder(base, kwargs["backend"], double_quant=True)
    return base


def make_trainer(adapted, steps, lr, data, grad_accum=1):
    """The real :class:`Trainer` over exactly the rows of ``data`` (every step sees the same batch): AdamW on the
    method's param groups, constant lr, no clipping, the method's callbacks in the trainer's own order."""
    rows = len(data["input_ids"])
    return caps.trainer_for(adapted, steps, lr, data, batch_size=rows // grad_accum, grad_accum=grad_accum)


def train_steps(adapted, steps, lr, data):
    """``steps`` calls of the real ``Trainer.train_step``; returns each step's loss (before its update)."""
    trainer = make_trainer(adapted, steps, lr, data)
    trainer.model.train()
    losses = [trainer.train_step()[0] for _ in range(steps)]
    adapted.model.eval()
    return losses


@pytest.mark.parametrize("case_id,name,kwargs,lr,mergeable", CASES)
class TestContract:
    def test_forward_shapes_and_identity_at_init(self, case_id, name, kwargs, lr, mergeable):
        a = make(name, kwargs)
        a.model.eval()
        data = batch()
        out = a.model(**data)
        assert out.logits.shape == (2, 12, 256) and out.loss.ndim == 0
        lora_b = [p for n, p in a.model.named_parameters() if "lora_B" in n]
        assert all(torch.count_nonzero(p) == 0 for p in lora_b)  # LoRA's update starts at exactly zero
        ref = reference_model(name, kwargs).eval()(**data)
        if case_id == "qlora-bnb":
            # bitsandbytes' CPU kernel repacks weights on first inference and computes in bf16: compare loosely
            assert ((out.logits - ref.logits).norm() / ref.logits.norm()) < 1e-2
        else:
            assert torch.allclose(out.logits, ref.logits, atol=1e-5)

    def test_only_method_parameters_change(self, case_id, name, kwargs, lr, mergeable):
        a = make(name, kwargs)
        trainable = {id(p) for p in a.trainable_parameters()}
        assert trainable, "no trainable parameters"
        tensors = list(a.model.named_parameters(remove_duplicate=False)) + list(a.model.named_buffers())
        before = {n: t.detach().clone() for n, t in tensors}
        train_steps(a, 3, lr, batch())
        changed = {n for n, t in tensors if not torch.equal(before[n], t)}
        owned = set(
            a.state_dict()
        )  # method state: trainable tensors and declared method buffers (PST's sparsity)
        outside = {n for n, t in tensors if n in changed and id(t) not in trainable and n not in owned}
        assert changed and not outside, f"changed outside the method: {sorted(outside)[:3]}"

    def test_loss_falls_on_repeated_batch(self, case_id, name, kwargs, lr, mergeable):
        a = make(name, kwargs)
        losses = train_steps(a, 30, lr, batch())
        assert losses[-1] < 0.85 * losses[0], losses

    def test_save_load_round_trip(self, case_id, name, kwargs, lr, mergeable, tmp_path):
        a = make(name, kwargs)
        train_steps(a, 2, lr, batch())
        a.save(tmp_path / "m")
        b = make(name, kwargs)
        b.load(tmp_path / "m")
        b.model.eval()
        data = batch(seed=1)
        assert torch.allclose(a.model(**data).logits, b.model(**data).logits, atol=1e-6)
        assert (tmp_path / "m" / "slimtune_config.json").is_file()

    def test_merge_gives_plain_model_with_equal_logits(self, case_id, name, kwargs, lr, mergeable):
        a = make(name, kwargs)
        if not mergeable:
            with pytest.raises(NotImplementedError, match="cannot be merged"):
                a.merge()
            return
        train_steps(a, 2, lr, batch())
        data = batch(seed=2)
        expected = a.model(**data).logits
        merged = a.merge()
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
        got = merged.eval()(**data).logits
        if case_id == "qlora-bnb":  # bnb multiplies by bf16-rounded weights on CPU; the merge is fp32
            assert ((got - expected).norm() / expected.norm()) < 1e-2
        else:
            assert torch.allclose(got, expected, atol=1e-4)

    def test_bad_config_raises_clear_error(self, case_id, name, kwargs, lr, mergeable):
        cls = METHODS[name].config_cls
        own = {
            "sat": ({"rate": 1.5}, r"rate: 1.5 must be in \[0, 1\)"),
            "pst": ({"weight_rank": 0}, "weight_rank: 0"),
        }
        if name in own:
            with pytest.raises(ConfigError, match=own[name][1]):
                cls(**own[name][0])
            return
        bad = {"r": -1} if "r" in cls.__dataclass_fields__ else {"freeze_embeddings": None}
        if "r" in bad:
            with pytest.raises(ConfigError, match=r"r: -1 must be > 0"):
                cls(**bad)
        else:
            from slimtune.core.schema import build

            problems = []
            build(cls, {"freeze_embeddings": "yes"}, "method", problems)
            assert problems == ["method.freeze_embeddings: 'yes' is not true/false"]


def test_peft_loads_lora_output(tmp_path):
    from peft import PeftModel

    a = make("lora", {"r": 4, "dropout": 0.0})
    train_steps(a, 2, 1e-2, batch())
    a.save(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "lora")).eval()
    data = batch(seed=3)
    assert torch.allclose(reloaded(**data).logits, a.model(**data).logits, atol=1e-6)


def test_qlora_backends_give_identical_codes_and_logits():
    if not BNB:
        pytest.skip("bitsandbytes 4-bit not usable here")
    a = reference_model("qlora", {"backend": "torch"}).eval()
    b = reference_model("qlora", {"backend": "bitsandbytes"}).eval()
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):  # before any forward (bnb repacks then)
        assert torch.equal(
            a.model.layers[1].get_submodule(name).qweight, b.model.layers[1].get_submodule(name).weight.data
        )
    data = batch()
    la, lb = a(**data).logits, b(**data).logits
    assert ((la - lb).norm() / la.norm()) < 1e-2  # bnb computes with bf16-rounded weights on CPU


def test_qlora_keeps_no_float_decoder_weights():
    a = make("qlora", {"r": 4, "backend": "torch"})
    for n, _ in a.model.named_parameters():
        assert "lora_" in n or "embed" in n or "norm" in n, n
    frozen = [b for b in a.model.buffers() if b.dtype == torch.uint8]
    assert sum(b.numel() for b in frozen) > 0


def test_merge_leaves_the_adapted_model_intact():
    a = make("lora", {"r": 4})
    merged = a.merge()
    assert merged is not a.model and any("lora_A" in n for n, _ in a.model.named_parameters())


def test_qlora_bnb_stays_differentiable_after_an_eval_pass():
    """Regression: bitsandbytes' CPU inference repack made the 4-bit layers non-differentiable afterwards."""
    if not BNB:
        pytest.skip("bitsandbytes 4-bit not usable here")
    a = make("qlora", {"r": 4, "dropout": 0.0, "backend": "bitsandbytes"})
    a.model.eval()
    with torch.no_grad():
        a.model(**batch())
    a.model.train()
    emb = a.model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    a.model(**batch()).loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    lin = a.model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    x = torch.randn(2, 3, lin.in_features, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None


class _Recorder:
    """Wraps an Adapted's callbacks to record the order the trainer calls them in."""

    def __init__(self, adapted, log):
        for name in ("on_step_start", "after_backward", "optimizer_step", "on_step_end"):
            real = getattr(adapted, name)
            setattr(adapted, name, self._wrap(name, real, log))

    @staticmethod
    def _wrap(name, real, log):
        def call(arg):
            log.append((name, arg if isinstance(arg, int) else "optimizer"))
            return real(arg)

        return call


def test_trainer_calls_the_callbacks_in_the_documented_order(monkeypatch):
    """on_step_start -> every micro-batch's backward -> after_backward -> optimizer -> optimizer_step ->
    on_step_end(steps completed), as Adapted's docstring says."""
    a = make("meft", {"r": 256, "k": 16, "experts": 16, "n_probe": 4})
    log = []
    _Recorder(a, log)
    trainer = make_trainer(a, 2, 1e-2, batch(b=4), grad_accum=2)
    real_backward = trainer.acc.backward
    monkeypatch.setattr(
        trainer.acc, "backward", lambda loss: (log.append(("backward", None)), real_backward(loss))
    )
    real_opt_step = trainer.optimizer.step
    monkeypatch.setattr(
        trainer.optimizer, "step", lambda *a, **k: (log.append(("adamw", None)), real_opt_step())
    )
    trainer.model.train()
    trainer.train_step()
    trainer.train_step()
    one = [("backward", None), ("backward", None), ("adamw", None), ("optimizer_step", "optimizer")]
    assert log == [
        ("on_step_start", 0), *one[:2], ("after_backward", 0), *one[2:], ("on_step_end", 1),
        ("on_step_start", 1), *one[:2], ("after_backward", 1), *one[2:], ("on_step_end", 2),
    ]  # fmt: skip


@dataclass
class NormTuneConfig(MethodConfig):
    """A sixth method written as CONTRIBUTING.md says: train only the RMSNorm gains."""

    name: ClassVar[str] = "normtune"
    scale: float = 1.0
    """An unused knob, to show the config machinery."""

    def check(self):
        return positive(self, "scale")


def apply_normtune(model, cfg: NormTuneConfig) -> Adapted:
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("norm.weight"))
    return Adapted(model, cfg)


def test_a_new_method_needs_only_its_registry_line(
    monkeypatch, tiny_model_dir, instr_jsonl, tmp_path, capsys
):
    """Config validation, `slimtune train`, `list`, checkpoints and reload learn a new method from its
    MethodSpec alone: nothing else is edited."""
    from slimtune.cli import main
    from slimtune.methods import METHODS, MethodSpec
    from slimtune.recipes import train as api
    from slimtune.training import config as C

    spec = MethodSpec("normtune", NormTuneConfig, apply_normtune, "adapter", "RMSNorm gains only")
    monkeypatch.setitem(METHODS, "normtune", spec)
    with pytest.raises(ConfigError, match=r"method.scale: -1.0 must be > 0"):
        C.from_dict({"data": {"path": str(instr_jsonl)}, "method": {"name": "normtune", "scale": -1}})
    raw = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(instr_jsonl), "max_length": 64},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run"),
                  "num_generations": 0, "eval_metric": False},
        "method": {"name": "normtune"},
    }  # fmt: skip
    res = api.train(C.from_dict(raw))
    assert res["steps"] == 3 and res["trainable_params"] == 5 * 64  # 2 layers x 2 norms + the final norm
    _, p = api.load_run(tmp_path / "run")
    assert all(n.endswith("norm.weight") for n in p.adapted.state_dict())
    assert main(["list"]) == 0 and "normtune [trainer] RMSNorm gains only" in capsys.readouterr().out


def test_the_trainer_s_adamw_is_fused_where_it_can_be_and_steps_as_the_default_one():
    """PyTorch's fused AdamW (no parameter-sized temporaries) for plain tensors on CPU/CUDA; the same updates as
    the default ``foreach`` step, with the parameters' version counters bumped as the default step does;
    parameters it cannot take (here on the meta device) get the default."""
    from slimtune.training.optim import make_adamw

    torch.manual_seed(0)
    start = [torch.randn(300, 7), torch.randn(11)]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_adamw([{"params": params, "weight_decay": 0.1}], 1e-2, fused=fused)
        assert bool(opt.defaults.get("fused")) is fused
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1) + i)
            versions = [p._version for p in params]
            opt.step()
            # every updated weight says so (caches keyed on it, e.g. PST's masked weight, must see the step)
            assert all(p._version > v for p, v in zip(params, versions))
        runs[fused] = params
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not any(float((a - s).abs().max()) == 0 for a, s in zip(runs[True], start))  # it did step
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not make_adamw([{"params": meta}], 1e-3).defaults.get("fused")


def test_every_trainer_method_has_a_contract_row():
    """A method registered without a row in CASES fails here instead of silently getting no contract test."""
    from tests.registry import trainers

    rows = {c.values[1] if hasattr(c, "values") else c[1] for c in CASES}
    assert set(trainers()) <= rows, sorted(set(trainers()) - rows)
