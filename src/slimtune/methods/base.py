"""The method contract: ``apply(model, cfg) -> Adapted``; the trainer only ever talks to an ``Adapted``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.config import Checked
from slimtune.memory import TrafficCounter

STATE_FILE = "method_state.safetensors"
CONFIG_FILE = "slimtune_config.json"


@dataclass
class MethodConfig(Checked):
    """Base of every method's config; subclasses add fields (a docstring line each) and ``check()``."""

    name: ClassVar[str] = "base"

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass
class TrainerHooks:
    """Optional callbacks the trainer calls; each receives ``(step: int, adapted: Adapted)``."""

    on_step_start: Callable[[int, Adapted], None] | None = None
    after_backward: Callable[[int, Adapted], None] | None = None
    on_step_end: Callable[[int, Adapted], None] | None = None
    on_eval_start: Callable[[int, Adapted], None] | None = None

    def call(self, name: str, step: int, adapted: Adapted) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(step, adapted)


class Adapted:
    """A model prepared by a method. Methods subclass this once and override what they need.

    ``model.forward(input_ids, attention_mask, labels)`` returns an HF-style output with ``.loss``/``.logits``.
    Trainable parameter names carry the method prefix (``lora_``, ``full.`` ...).
    """

    def __init__(self, model: nn.Module, cfg: MethodConfig, hooks: TrainerHooks | None = None):
        self.model = model
        self.cfg = cfg
        self.hooks = hooks or TrainerHooks()
        # JSON-able method state (schedules, counters) saved with checkpoints
        self.extra_state: dict[str, Any] = {}
        # bytes a method moves host<->device; the method increments it, reports and bench read it
        self.traffic = TrafficCounter()
        # optimizer steps the run will take (the trainer sets it; schedules read it); None = unknown
        self.total_steps: int | None = None

    # ---- training surface
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases and norm weights (1-D tensors)."""
        decay, no_decay = [], []
        for _, p in self.named_trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None
    """A method that updates some state itself (e.g. host-resident rows) sets this; called after opt.step() with
    the trainer's optimizer (its first param group carries the current lr, betas, eps, weight decay)."""

    def extra_state_scalars(self) -> dict[str, float]:
        """Numbers from ``extra_state`` worth logging each step (e.g. a current omission rate)."""
        return {
            f"method/{k}": v
            for k, v in self.extra_state.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    # ---- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define this method's result (trainable and any method buffers)."""
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    def require_complete(self, state: dict[str, torch.Tensor]) -> None:
        """Raise if ``state`` lacks any tensor this method's ``state_dict`` has."""
        missing = [n for n in self.state_dict() if n not in state]
        if missing:
            raise KeyError(
                f"method '{self.cfg.name}' state is missing {len(missing)} tensors, e.g. {missing[:3]}"
            )

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        self.require_complete(state)
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))

    def save(self, out_dir: str | Path, extra_config: dict | None = None) -> Path:
        """Write ``method_state.safetensors`` + ``slimtune_config.json`` (method config, base model, extras)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / STATE_FILE))
        meta = {"method": self.cfg.to_dict(), "extra_state": self.extra_state, **(extra_config or {})}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        return out

    def load(self, in_dir: str | Path) -> None:
        in_dir = Path(in_dir)
        self.load_state_dict(load_file(str(in_dir / STATE_FILE)))
        meta = json.loads((in_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        self.extra_state.update(meta.get("extra_state", {}))

    def merge(self) -> nn.Module:
        """A plain HF model with the method folded in (where the method allows it)."""
        raise NotImplementedError(f"method '{self.cfg.name}' cannot be merged into a plain model")

    def bench_facts(self, seq_len: int) -> dict:
        """Method-specific figures a benchmark reports next to its measurements (e.g. a FLOP-share limit)."""
        return {}

    def memory_report(self) -> dict[str, int]:
        """Bytes by role: frozen weights, trainable, gradients, buffers (optimizer state is the trainer's)."""
        from slimtune.memory import module_bytes_by_role

        return module_bytes_by_role(self.model)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int | None,
    ) -> torch.Tensor:
        """Greedy continuation of a left-padded batch; returns only the new tokens."""
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        return out[:, input_ids.shape[1] :]


class ApplyFn(Protocol):
    def __call__(self, model: nn.Module, cfg: MethodConfig) -> Adapted: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to configure and apply one method."""

    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    family: str
    """full | adapter | quantized: picks the default baseline when benchmarking."""
    summary: str
    needs: tuple[str, ...] = field(default_factory=tuple)
    """Optional packages the method needs (checked before use)."""
