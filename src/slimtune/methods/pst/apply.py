"""Applying PST: swap the targeted linears for ``PSTLinear``, freeze the rest, run the cubic sparsity schedule
after every optimizer step, and merge into a plain sparse HF model."""

from __future__ import annotations

import copy
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.errors import UserError
from slimtune.methods.base import Adapted
from slimtune.methods.pst.config import PSTConfig
from slimtune.methods.pst.layer import PSTLinear
from slimtune.methods.state import require_complete
from slimtune.modules.losses import IGNORE

log = logging.getLogger(__name__)


def cubic_sparsity(step: int, total: int, cfg: PSTConfig) -> float:
    """Zhu & Gupta's cubic ramp: s_i until t_w, s_f after T - t_c, s_f + (s_i - s_f)(1 - progress)^3 between."""
    t_w, t_c = cfg.warmup_frac * total, cfg.cooldown_frac * total
    if step <= t_w:
        return cfg.init_sparsity
    if step > total - t_c:
        return cfg.sparsity
    progress = (step - t_w) / (total - t_w - t_c)
    return cfg.sparsity + (cfg.init_sparsity - cfg.sparsity) * (1 - progress) ** 3


def _matches(name: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def pst_layers(model: nn.Module) -> dict[str, PSTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PSTLinear)}


def set_sparsity(model: nn.Module, sparsity: float, nm: tuple[int, int] | None) -> None:
    for layer in pst_layers(model).values():
        layer.sparsity.fill_(sparsity)
        layer.nm = nm


def sparsity_report(model: nn.Module) -> dict:
    """Zeros per targeted layer (of the masked weight) and overall; works on PST and on merged models."""
    layers = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if isinstance(m, PSTLinear):
            w = m.merged_linear().weight
        elif isinstance(m, nn.Linear) and m is not head:
            w = m.weight
        else:
            continue
        layers[name] = (int((w == 0).sum()), w.numel())
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"layers": layers, "zeros": zeros, "numel": total, "sparsity": zeros / max(total, 1)}


def _is_pst_buffer(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "sparsity" or leaf.startswith("pst_in_")


class PSTAdapted(Adapted):
    """PST's state: U, V, A, B, R, C of every ``PSTLinear`` plus its sparsity (and wanda statistics) buffers."""

    cfg: PSTConfig

    def compile_refusal(self) -> str | None:
        return "its top-k masks are keyed on host-side scalars (Tensor.item()), which break the traced graph"

    def __init__(self, model: nn.Module, cfg: PSTConfig):
        super().__init__(model, cfg)
        self.extra_state["sparsity"] = cfg.init_sparsity

    def loss_head(self) -> nn.Linear | None:
        # the distillation term reads the student's logits (a forward hook on the model's output)
        return None if self.cfg.distill_weight > 0 else super().loss_head()

    def on_step_start(self, step: int) -> None:
        if self.total_steps is None and step == 0:  # benchmarks: held at the target (the cool-down state)
            self.on_step_end(0)

    def on_step_end(self, step: int) -> None:
        """After optimizer step ``step`` (completed count): the sparsity the next forward uses."""
        cfg, total, nm = self.cfg, self.total_steps, self.cfg.nm()
        s = cfg.sparsity if not total else cubic_sparsity(step, total, cfg)
        cooling = nm is not None and (not total or step > total - cfg.cooldown_frac * total)
        set_sparsity(self.model, s, nm if cooling else None)
        refresh = step % cfg.mask_update_interval == 0
        for layer in pst_layers(self.model).values():
            layer.freeze_mask = not refresh
            if refresh:
                layer.refresh_prior()
        self.extra_state["sparsity"] = round(s, 6)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        out.update({n: b.detach() for n, b in self.model.named_buffers() if _is_pst_buffer(n)})
        return out

    def step_state(self) -> list[torch.Tensor]:
        """score_prior wanda: the input statistics each training forward adds to (a skipped step's batch, e.g.
        one with NaN activations, must not stay in them)."""
        return [b for n, b in self.model.named_buffers() if n.endswith(("pst_in_sq", "pst_in_count"))]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buffers = dict(self.model.named_buffers())
        require_complete(self, state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                target = buffers[k] if k in buffers else params[k]
                target.copy_(v.to(target.dtype))
        nm = self.cfg.nm()
        cool = nm is not None and any(
            float(b) >= self.cfg.sparsity for k, b in buffers.items() if k.endswith(".sparsity")
        )
        for layer in pst_layers(self.model).values():
            layer.nm = nm if cool else None

    def merge(self) -> nn.Module:
        """A plain model whose targeted linears hold M ⊙ (W0 + βUV) at the current sparsity (the training model's
        eval output, exactly). Merging before the schedule reaches the target gives a less sparse model: warned."""
        layers = pst_layers(self.model)
        current = max((float(m.sparsity) for m in layers.values()), default=0.0)
        if current < self.cfg.sparsity:
            log.warning(
                "PST merge at sparsity %.3f, below the target %.3f (the schedule has not finished)",
                current,
                self.cfg.sparsity,
            )
        merged = copy.deepcopy(self.model)
        for name, layer in pst_layers(merged).items():
            merged.set_submodule(name, layer.merged_linear())
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged


def context_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose next token is real and not a training target (prompt/context predictions)."""
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool() & (labels[:, 1:] == IGNORE)
    return sel


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T)); rows are positions, [N, V]."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


def _add_distillation(model: nn.Module, adapted: Adapted, cfg: PSTConfig) -> None:
    """Forward hook: in training, loss += γ·KL(unmasked teacher ‖ model) over the context positions."""
    busy = False

    def hook(module, args, kwargs, output):
        nonlocal busy
        labels, attn = kwargs.get("labels"), kwargs.get("attention_mask")
        if busy or not module.training or labels is None or getattr(output, "loss", None) is None:
            return None
        if attn is None:
            attn = torch.ones_like(labels)
        sel = context_positions(attn, labels)
        if not bool(sel.any()):
            return None
        layers = pst_layers(module).values()
        busy = True
        try:
            for layer in layers:
                layer.teacher = cfg.distill_from
            with torch.no_grad():
                teacher = module(input_ids=kwargs["input_ids"], attention_mask=attn).logits[sel]
        finally:
            busy = False
            for layer in layers:
                layer.teacher = None
        kd = distillation_kl(output.logits[sel], teacher, cfg.distill_temperature)
        adapted.extra_state["task_loss"] = round(float(output.loss.detach()), 6)
        adapted.extra_state["distill_kl"] = round(float(kd.detach()), 6)
        output.loss = output.loss + cfg.distill_weight * kd
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def apply_pst(model: nn.Module, cfg: PSTConfig) -> PSTAdapted:
    head = model.get_output_embeddings()
    if cfg.target_modules == ["all-linear"]:
        targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    else:
        targets = [
            (n, m) for n, m in model.named_modules() if _matches(n, cfg.target_modules) and m is not head
        ]
    if not targets:
        raise UserError(
            f"method.target_modules: {cfg.target_modules} matches no module of {type(model).__name__}"
        )
    bad = [f"{n} ({type(m).__name__})" for n, m in targets if type(m) is not nn.Linear]
    if bad:
        raise UserError(
            f"method.target_modules: PST wraps torch.nn.Linear only; unsupported: {', '.join(bad[:3])}"
        )
    nm = cfg.nm()
    if nm:
        odd = [n for n, m in targets if m.in_features % nm[1]]
        if odd:
            raise UserError(
                f"method.pattern {cfg.pattern}: in_features of {odd[0]} is not a multiple of {nm[1]}"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        layer = PSTLinear(lin, cfg)
        layer.nm_ramp = nm if nm and cfg.nm_schedule == "gradual" else None
        model.set_submodule(name, layer)
    for name, m in model.named_modules():
        if cfg.extra_trainable and _matches(name, cfg.extra_trainable):
            for p in m.parameters():
                p.requires_grad_(True)
    set_sparsity(model, cfg.init_sparsity, None)
    adapted = PSTAdapted(model, cfg)
    if cfg.distill_weight > 0:
        _add_distillation(model, adapted, cfg)
    return adapted
