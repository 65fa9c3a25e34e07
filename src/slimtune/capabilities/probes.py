"""What each trainer method does on each decoder family, in each dtype, with each trainer feature: found by
probing tiny random models (``slimtune.models.families``), never declared by hand.

``probe_family(method, family)`` runs the method contract on a tiny model of the family (identity at init, only
method tensors change in the real trainer, loss falls, save -> load, merge or a refusal, generation, the
method's ``self_check``); a method that cannot support a family refuses at ``apply`` with one line. The matrix
is written by ``scripts/capabilities.py`` and read by ``render.py``.
"""

from __future__ import annotations

import functools
import importlib
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from slimtune.core.errors import ConfigError, UserError
from slimtune.methods import METHODS, TRAINER, get_spec, trainer_methods
from slimtune.methods import state as method_state
from slimtune.methods.base import Adapted


class _Settings(Mapping):
    """(tiny-model settings, learning rate) of each trainer method, read live from its registry entry."""

    def __getitem__(self, name: str) -> tuple[dict, float]:
        spec = METHODS[name]
        if spec.kind != TRAINER:
            raise KeyError(name)
        return spec.probe, spec.probe_lr

    def __iter__(self):
        return iter(trainer_methods())

    def __len__(self) -> int:
        return len(trainer_methods())


SETTINGS = _Settings()
STEPS = 30


@dataclass
class Cell:
    status: str  # yes | no (refused at apply, with its one line) | FAIL (anything else)
    note: str = ""


def batch(vocab: int = 256, b: int = 2, t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def adapt(method: str, family: str, dtype: torch.dtype = torch.float32, **extra):
    from slimtune.methods import apply, make_config
    from slimtune.models.families import tiny_model

    torch.manual_seed(123)
    settings = {**SETTINGS[method][0], **extra}
    return apply(tiny_model(family, dtype=dtype), make_config(method, **settings))


def trainer_for(
    adapted, steps: int, lr: float, data: dict, run_dir: Path | None = None, resume: bool = False, **train
):
    """The real :class:`~slimtune.training.trainer.Trainer` over exactly ``data`` (every step sees the same rows),
    writing into ``run_dir`` (default: a new temporary directory)."""
    from slimtune.data.records import Encoded
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    rows = data["input_ids"].tolist()
    opts = {"batch_size": len(rows), "schedule": "constant", "max_grad_norm": None, "mixed_precision": "no"}
    cfg = TrainConfig(steps=steps, lr=lr, **{**opts, **train})
    enc = Encoded(rows, [list(r) for r in rows])
    pad = SimpleNamespace(pad_token_id=0)
    run_dir = run_dir or Path(tempfile.mkdtemp())
    return Trainer(adapted, pad, cfg, enc, Encoded([], []), [], None, run_dir, resume=resume)


def train(adapted, steps: int, lr: float, data: dict, **train_opts) -> list[float]:
    trainer = trainer_for(adapted, steps, lr, data, **train_opts)
    trainer.model.train()
    losses = [trainer.train_step()[0] for _ in range(steps)]
    adapted.model.eval()
    return losses


def _reference(method: str, family: str) -> nn.Module:
    """What the adapted model must equal at initialisation: the base (quantized where the method quantizes)."""
    from slimtune.models.families import tiny_model
    from slimtune.modules.quant.backbone import quantize_decoder

    base = tiny_model(family)
    if get_spec(method).four_bit_base:
        quantize_decoder(base, "torch", double_quant=True)
    return base.eval()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _contract(method: str, family: str, a) -> None:
    data, lr = batch(), SETTINGS[method][1]
    a.model.eval()
    got, want = a.model(**data).logits, _reference(method, family)(**data).logits
    _check(
        torch.allclose(got, want, atol=1e-5), f"not the base model at init ({(got - want).abs().max():.2e})"
    )
    tensors = list(a.model.named_parameters(remove_duplicate=False)) + list(a.model.named_buffers())
    before = {n: t.detach().clone() for n, t in tensors}
    trainable = {id(p) for p in a.trainable_parameters()}
    losses = train(a, STEPS, lr, data)
    changed = {n for n, t in tensors if not torch.equal(before[n], t)}
    owned = set(a.state_dict())
    outside = sorted(n for n, t in tensors if n in changed and id(t) not in trainable and n not in owned)
    _check(changed and not outside, f"tensors outside the method changed: {outside[:3]}")
    _check(losses[-1] < 0.95 * losses[0], f"loss did not fall by 5%: {losses[0]:.3f} -> {losses[-1]:.3f}")
    _round_trip(method, family, a)
    _merge(a)
    out = a.generate(data["input_ids"][:, :5], data["attention_mask"][:, :5], 3, None, 0)
    _check(tuple(out.shape) == (2, 3), f"generation gave shape {tuple(out.shape)}")


def _round_trip(method: str, family: str, a) -> None:
    data = batch(seed=1)
    b = method_state.round_trip(a, adapt(method, family))
    b.model.eval()
    got, want = b.model(**data).logits, a.model(**data).logits
    _check(
        torch.allclose(got, want, atol=1e-5),
        f"save -> load changed the logits ({(got - want).abs().max():.2e})",
    )


def _merge(a) -> None:
    data = batch(seed=2)
    try:
        merged = a.merge()
    except NotImplementedError as err:
        _check("cannot be merged" in str(err), f"merge refused without saying why: {err}")
        return
    foreign = [
        type(m).__name__
        for m in merged.modules()
        if not type(m).__module__.startswith(("torch", "transformers"))
    ]
    _check(not foreign, f"the merged model is not a plain HF model: {foreign[:3]}")
    got, want = merged.eval()(**data).logits, a.model(**data).logits
    _check(torch.allclose(got, want, atol=1e-4), f"merged logits differ ({(got - want).abs().max():.2e})")


def probe_family(method: str, family: str) -> Cell:
    """Run the contract of ``method`` on a tiny ``family`` model."""
    try:
        a = adapt(method, family)
    except (UserError, ConfigError) as err:
        return _refusal(err)
    try:
        _contract(method, family, a)
        if type(a).self_check is not Adapted.self_check:  # a method's own invariant, on a fresh model
            adapt(method, family).self_check(batch(seed=4))
    except Exception as err:  # recorded, so one broken cell does not hide the others
        return _failure(err)
    return Cell("yes")


def probe_workflow(probe, family: str) -> Cell:
    """A workflow method's own probe on one family (its recipe's ``probe_family``; PEMA: the owner side)."""
    try:
        probe(family)
    except UserError as err:
        return Cell("no", str(err))
    except Exception as err:
        return Cell("FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return Cell("yes")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _refusal(err: Exception) -> Cell:
    line = str(err) if isinstance(err, UserError) else "; ".join(err.problems)
    return Cell("no", line) if "\n" not in line else Cell("FAIL", f"multi-line refusal: {line!r}")


def _failure(err: Exception) -> Cell:
    return Cell("FAIL", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}")


def _dtype_run(method: str, dtype: torch.dtype) -> None:
    """Model stored in ``dtype``; the real trainer; the saved state loads into an fp32 model and gives the same
    eval loss within 5%."""
    data, lr = batch(), SETTINGS[method][1]
    a = adapt(method, "llama", dtype=dtype)
    losses = train(a, STEPS, lr, data)
    _check(all(torch.isfinite(torch.tensor(losses))), f"non-finite loss: {losses[-3:]}")
    _check(losses[-1] < 0.95 * losses[0], f"loss did not fall by 5%: {losses[0]:.3f} -> {losses[-1]:.3f}")
    low = float(a.model(**data).loss)
    b = method_state.round_trip(a, adapt(method, "llama"))
    full = float(b.model.eval()(**data).loss)
    _check(abs(full - low) <= 0.05 * low, f"fp32 reload: eval loss {full:.3f} vs {low:.3f} in {dtype}")


def probe_dtype(method: str, dtype: str) -> Cell:
    try:
        _dtype_run(method, DTYPES[dtype])
    except (UserError, ConfigError) as err:
        return _refusal(err)
    except Exception as err:
        return _failure(err)
    return Cell("yes")


def _state(a) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in a.state_dict().items()}


def _same_state(x: dict, y: dict, atol: float) -> bool:
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=atol) for k in x)


def _autocast(method: str, precision: str) -> None:
    """fp32 weights, ``precision`` autocast (train.mixed_precision, how a CUDA run computes; on CUDA fp16 also
    gets accelerate's loss scaler): loss finite and falling, and the trained state evaluates like it under
    autocast within 5%."""
    from accelerate.state import AcceleratorState

    data, lr = batch(), SETTINGS[method][1]
    a = adapt(method, "llama")
    # accelerate keeps one precision per process state: probe in a fresh one, and leave a fresh one behind
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = trainer_for(a, STEPS, lr, data, mixed_precision=precision)
        trainer.model.train()
        losses = [trainer.train_step()[0] for _ in range(STEPS)]
        a.model.eval()
        with trainer.acc.autocast():
            mixed = float(a.model(**data).loss)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    _check(all(torch.isfinite(torch.tensor(losses))), f"non-finite loss: {losses[-3:]}")
    _check(losses[-1] < 0.95 * losses[0], f"loss did not fall by 5%: {losses[0]:.3f} -> {losses[-1]:.3f}")
    full = float(a.model(**data).loss)
    _check(abs(full - mixed) <= 0.05 * full, f"fp32 eval {full:.3f} vs {precision}-autocast eval {mixed:.3f}")


def _grad_checkpointing(method: str) -> None:
    """Recomputing activations gives the same trained state as keeping them."""
    data, lr = batch(), SETTINGS[method][1]
    a, b = adapt(method, "llama"), adapt(method, "llama")
    train(a, 3, lr, data)
    train(b, 3, lr, data, grad_checkpointing=True)
    _check(_same_state(_state(a), _state(b), 1e-5), "checkpointed training ended elsewhere")


def _compile(method: str) -> None:
    """``train.compile``: the decoder layers compile (Dynamo traced at least one graph of them) and training
    through them ends where eager training does."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    data, lr = batch(), SETTINGS[method][1]
    # a 4-bit method on the backend it picks by itself here (bitsandbytes, where it runs, compiles)
    extra = {"backend": "auto"} if "backend" in SETTINGS[method][0] else {}
    a, b = adapt(method, "llama", **extra), adapt(method, "llama", **extra)
    train(a, 3, lr, data)
    torch._dynamo.reset()  # a fresh cache: the graphs counted are this method's
    counters.clear()
    train(b, 3, lr, data, compile=True)
    _check(counters["stats"]["unique_graphs"] > 0, "no decoder layer was compiled")
    breaks = sum(counters["graph_break"].values())
    _check(breaks == 0, f"{breaks} graph breaks in the layers: {list(counters['graph_break'])[:1]}")
    _check(_same_state(_state(a), _state(b), 1e-5), "compiled training ended elsewhere")


def _in_backward(method: str) -> None:
    """``train.optimizer_in_backward``: each parameter steps inside backward, and training ends exactly (bit for
    bit) where the ordinary step does, weight decay on (neither clips)."""
    data, lr = batch(), SETTINGS[method][1]
    a, b = adapt(method, "llama"), adapt(method, "llama")
    train(a, 3, lr, data, weight_decay=0.1)
    train(b, 3, lr, data, weight_decay=0.1, optimizer_in_backward=True)
    x, y = _state(a), _state(b)
    same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    _check(same, "training with the step inside backward ended elsewhere")


def _grad_accumulation(method: str) -> None:
    """Two micro-batches of 2 per step train (loss finite and falling)."""
    data, lr = batch(b=4), SETTINGS[method][1]
    losses = train(adapt(method, "llama"), STEPS, lr, data, batch_size=2, grad_accum=2)
    _check(losses[-1] < 0.95 * losses[0], f"loss did not fall by 5%: {losses[0]:.3f} -> {losses[-1]:.3f}")


def _resume(method: str) -> None:
    """4 steps with a checkpoint after step 2 and a crash; a fresh model and trainer resume from it: the state
    after step 4 equals the uninterrupted run's (schedules, optimizer, RNG and data position all restored)."""
    data, lr = batch(b=4), SETTINGS[method][1]
    a = adapt(method, "llama")
    straight = trainer_for(a, 4, lr, data, batch_size=2)
    straight.model.train()
    for _ in range(4):
        straight.train_step()
    b = adapt(method, "llama")
    crashed = trainer_for(b, 4, lr, data, batch_size=2)
    crashed.model.train()
    crashed.train_step()
    crashed.train_step()
    crashed.save_checkpoint()
    c = adapt(method, "llama")
    resumed = trainer_for(c, 4, lr, data, run_dir=crashed.run_dir, resume=True, batch_size=2)
    resumed.train(resume=True)
    _check(resumed.step == 4, f"resumed run ended at step {resumed.step}")
    _check(
        _same_state(_state(a), _state(c), 1e-6), "the resumed run ended elsewhere than the uninterrupted one"
    )


def _merge_export(method: str) -> None:
    a = adapt(method, "llama")
    train(a, 2, SETTINGS[method][1], batch())
    a.merge()  # NotImplementedError (a refusal) or a plain model (checked by the family probe)


def _peft_format(method: str) -> None:
    a = adapt(method, "llama")
    with tempfile.TemporaryDirectory() as tmp:
        a.save(tmp)
        files = {p.name for p in Path(tmp).iterdir()}
    if not {"adapter_config.json", "adapter_model.safetensors"} <= files:
        raise NotImplementedError("saves slimtune's own format")


def _four_bit(method: str) -> None:
    from slimtune.modules.quant.backbone import is_4bit

    a = adapt(method, "llama")
    if not any(is_4bit(m) for m in a.model.modules()):
        raise NotImplementedError("keeps the base in full precision")


FEATURES = {
    "bf16_autocast": functools.partial(_autocast, precision="bf16"),
    "fp16_autocast": functools.partial(_autocast, precision="fp16"),
    "merge": _merge_export,
    "peft_format": _peft_format,
    "4bit_base": _four_bit,
    "grad_checkpointing": _grad_checkpointing,
    "compile": _compile,
    "optimizer_in_backward": _in_backward,
    "grad_accumulation": _grad_accumulation,
    "resume": _resume,
}


def probe_feature(method: str, feature: str) -> Cell:
    try:
        FEATURES[feature](method)
    except NotImplementedError as err:
        return Cell("no", str(err).splitlines()[0])
    except (UserError, ConfigError) as err:
        return _refusal(err)
    except Exception as err:
        return _failure(err)
    return Cell("yes")


def probe_all(methods=None, families=None) -> dict:
    from slimtune.models.families import FAMILIES

    methods = methods or list(SETTINGS)
    families = families or list(FAMILIES)
    table = {m: {f: asdict(probe_family(m, f)) for f in families} for m in methods}
    for spec in METHODS.values():
        if spec.kind != TRAINER:
            probe = importlib.import_module(spec.recipe).probe_family
            table[spec.name] = {f: asdict(probe_workflow(probe, f)) for f in families}
    features = {
        m: {
            **{d: asdict(probe_dtype(m, d)) for d in DTYPES},
            **{f: asdict(probe_feature(m, f)) for f in FEATURES},
        }
        for m in methods
    }
    return {"families": table, "features": features}
