"""A registry entry: what a method is, how it is configured and applied, and what it declares it supports. The
registry (``methods/__init__.py``) holds one per method; nothing outside ``methods/`` names a method."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from slimtune.methods.base import Adapted, MethodConfig


class ApplyFn(Protocol):
    def __call__(self, model: nn.Module, cfg: MethodConfig) -> Adapted: ...


TRAINER, WORKFLOW = "trainer", "workflow"


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to configure and apply one method.

    ``kind`` is ``trainer`` (``apply`` gives an :class:`Adapted` that `slimtune train` and `slimtune bench` run) or
    ``workflow`` (a method with its own command, ``command``; `train` and `bench` refuse it when they validate).
    """

    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn | None
    family: str
    """full | adapter | quantized: picks the default baseline when benchmarking."""
    summary: str
    needs: tuple[str, ...] = field(default_factory=tuple)
    """Optional packages the method needs (checked before ``apply``; the runtime memory figure imports them)."""
    kind: str = TRAINER
    command: str | None = None
    """workflow: the command that runs it (named in the refusal of `train` / `bench`)."""
    train_keys: tuple[str, ...] | None = None
    """workflow: the ``train.*`` keys it reads; any other set in a config is refused (None: all, for trainers)."""
    instead: dict[str, str] = field(default_factory=dict)
    """workflow: for a refused ``train.*`` key, the key that does its job (e.g. lr -> method.lr)."""
    probe: dict[str, Any] = field(default_factory=dict)
    """Settings for the capability probes' tiny models (hidden 64, 2 layers), where the defaults do not fit."""
    probe_lr: float = 1e-3
    """Learning rate of the probes' "loss falls" checks on a repeated batch."""
    baseline: str | None = None
    """The method this one is measured against (bench ratios, comparisons); None: itself."""
    four_bit_base: bool = False
    """Its frozen base is NF4 4-bit (what the adapted model equals at initialisation is the quantized base)."""
    sharding: str | None = None
    """None: it runs under FSDP2 and DeepSpeed ZeRO (2-process equivalence tests); else why not, in one line."""
    peers: tuple[str, ...] = ()
    """Other implementations `slimtune bench --peers` measures beside it (``hf``: transformers.Trainer + peft)."""
    recipe: str | None = None
    """workflow: the module of its recipe, whose ``add_command(subparsers)`` adds its CLI command."""

    def missing_packages(self, cfg: MethodConfig | None = None) -> list[str]:
        """Packages of ``needs`` (and ``cfg.needs()``) that are not installed."""
        wanted = self.needs + (cfg.needs() if cfg is not None else ())
        return [p for p in dict.fromkeys(wanted) if importlib.util.find_spec(p) is None]
