"""Method registry. A method joins slimtune by adding one ``MethodSpec`` here (and one row to the contract tests).

A ``trainer`` method gives an :class:`Adapted` that `slimtune train` and `slimtune bench` run; a ``workflow`` has
its own command (PEMA's offsite tuning: `slimtune pema ...`) and is refused by `train` and `bench` at validation.
"""

from __future__ import annotations

from torch import nn

from slimtune.core.errors import UserError
from slimtune.methods.base import Adapted, MethodConfig
from slimtune.methods.baselines import (
    FullConfig,
    LoraMethodConfig,
    QLoraMethodConfig,
    apply_full,
    apply_lora,
    apply_qlora,
)
from slimtune.methods.meft import MEFTConfig, apply_meft
from slimtune.methods.pema import PEMAConfig
from slimtune.methods.pst import PSTConfig, apply_pst
from slimtune.methods.qst import QSTConfig, apply_qst
from slimtune.methods.sat import SATConfig, apply_sat
from slimtune.methods.spec import TRAINER, WORKFLOW, MethodSpec
from slimtune.modules.activations import keep_fewer_activations

METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(
        "full", FullConfig, apply_full, "full", "full fine-tuning (every parameter trained)", peers=("hf",)
    ),
    "lora": MethodSpec(
        "lora",
        LoraMethodConfig,
        apply_lora,
        "adapter",
        "LoRA via peft (base frozen)",
        needs=("peft",),
        probe={"r": 4, "dropout": 0.0},
        probe_lr=5e-3,
        peers=("hf",),
    ),
    "qlora": MethodSpec(
        "qlora",
        QLoraMethodConfig,
        apply_qlora,
        "quantized",
        "LoRA on an NF4 4-bit frozen base (bitsandbytes or pure-torch NF4)",
        needs=("peft",),
        probe={"r": 4, "dropout": 0.0, "backend": "torch"},
        probe_lr=5e-3,
        four_bit_base=True,
        peers=("hf",),
    ),
    "qst": MethodSpec(
        "qst",
        QSTConfig,
        apply_qst,
        "quantized",
        "quantized side tuning: 4-bit backbone run without autograd + a d/r-wide side network",
        probe={"r": 4, "dropout": 0.0, "backend": "torch"},
        probe_lr=3e-2,
        baseline="qlora",
        four_bit_base=True,
    ),
    "sat": MethodSpec(
        "sat",
        SATConfig,
        apply_sat,
        "full",
        "sparsity-accelerated training: each step omits unimportant MLP channels / heads by slicing weights",
        probe={"rate": 0.5, "schedule": "constant"},
        baseline="full",
    ),
    "pst": MethodSpec(
        "pst",
        PSTConfig,
        apply_pst,
        "adapter",
        "parameter-efficient sparse training: LoRA update + learned low-rank/structured mask scores, sparse export",
        probe={"sparsity": 0.5},
        probe_lr=3e-3,
        baseline="lora",
    ),
    "meft": MethodSpec(
        "meft",
        MEFTConfig,
        apply_meft,
        "adapter",
        "wide sparse parallel adapter in host memory: per token top-K neurons, only touched rows on the device",
        probe={"r": 256, "k": 16, "experts": 16, "n_probe": 4},
        probe_lr=1e-2,
        baseline="lora",
        sharding="MEFT's adapter lives in host memory outside the model: there is nothing for FSDP or ZeRO to shard",
    ),
    "pema": MethodSpec(
        "pema",
        PEMAConfig,
        None,
        "adapter",
        "offsite tuning: adapter trained on the owner's final-layer states (external memory, Gradual Unrolling)",
        kind=WORKFLOW,
        command="slimtune pema build-memory|train|generate CONFIG",
        recipe="slimtune.recipes.pema_entry",
        baseline="lora",
        train_keys=("output_dir",),
        instead={
            "lr": "method.lr",
            "seed": "method.seed",
            "steps": "method.epochs_stage1 / method.epochs_stage2",
            "batch_size": "method.batch_stage1 / method.batch_stage2",
            "eval_every": "method.eval_every",
        },
    ),
}


PLAIN = "full"
"""The method whose adapted model is the plain model itself (evaluating or generating with a base model)."""


def trainer_methods() -> list[str]:
    """The methods `slimtune train` and `bench` run, in registry order."""
    return [n for n, s in METHODS.items() if s.kind == TRAINER]


def sharded_methods() -> list[str]:
    """Trainer methods that run under FSDP2 and DeepSpeed ZeRO (their ``sharding`` declares no refusal)."""
    return [n for n in trainer_methods() if METHODS[n].sharding is None]


def baseline_of(name: str) -> str:
    """The method ``name`` is measured against (itself where it is a baseline)."""
    return get_spec(name).baseline or name


def four_bit_baseline() -> str:
    """The baseline of the 4-bit methods (QST's speed ceiling is measured against it)."""
    return next(baseline_of(n) for n in trainer_methods() if METHODS[n].four_bit_base)


def get_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def require_trainer(name: str, where: str = "train") -> MethodSpec:
    """The spec of ``name`` if `slimtune train` / `bench` can run it; a workflow is refused with its command."""
    spec = get_spec(name)
    if spec.kind != TRAINER:
        raise UserError(
            f"method.name: {name} is a workflow, not a trainer method; `slimtune {where}` cannot run it: "
            f"use `{spec.command}`"
        )
    return spec


def make_config(name: str, **kwargs) -> MethodConfig:
    """``make_config("lora", r=8)`` -> a validated method config."""
    return get_spec(name).config_cls(**kwargs)


def apply(model: nn.Module, cfg: MethodConfig, spec: MethodSpec | None = None) -> Adapted:
    """Prepare ``model`` for training with the method ``cfg`` names. The only place a method touches the model.

    ``spec``: what :func:`require_trainer` returned for ``cfg.name`` where the job checked it before loading the
    model (`train`, `bench`, `plan`: each check runs once per job); without it the check runs here."""
    if spec is None:
        spec = require_trainer(cfg.name)
    elif spec.name != cfg.name:
        raise ValueError(f"apply: the spec of {spec.name!r} given for a {cfg.name!r} config")
    missing = spec.missing_packages(cfg)
    if missing:
        raise UserError(
            f"method {cfg.name} needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    adapted = spec.apply(model, cfg)
    keep_fewer_activations(adapted.model)  # exact (activations.py)
    return adapted


__all__ = [
    "METHODS",
    "PLAIN",
    "TRAINER",
    "WORKFLOW",
    "Adapted",
    "MethodConfig",
    "MethodSpec",
    "apply",
    "baseline_of",
    "four_bit_baseline",
    "get_spec",
    "make_config",
    "require_trainer",
    "sharded_methods",
    "trainer_methods",
]
