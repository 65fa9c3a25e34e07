"""Applying SAT: every Llama-style MLP and attention module computes, in training mode, with the neurons the
controller keeps for the current micro-batch; eval, generation and rate 0 run the module's own dense forward.

The modules keep their parameters and names (state dicts, optimizers and checkpoints are those of plain
training). The switch is an instance-level ``forward`` attribute set on each module (``remove_sat`` deletes it);
nothing in transformers is modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimtune.core.errors import UserError
from slimtune.methods.base import Adapted
from slimtune.methods.sat.config import OmissionSchedule, SATConfig, from_config
from slimtune.methods.sat.layer import (
    attend,
    attention_forward,
    attn_parts,
    base_weight,
    mlp_forward,
    mlp_parts,
    omitted_heads_output,
    omitted_mlp_output,
    omitted_slices,
    sliced_linear,
)
from slimtune.methods.sat.selection import activation_scores, choose, head_scores, mlp_scores, n_kept
from slimtune.modules.arch import decoder_layers, is_attention, is_gated_mlp
from slimtune.modules.losses import IGNORE

KINDS = {"mlp": 0, "attn": 1}


MAX_LAYER_RATE = 0.95


class SATController:
    """Holds the current omission rate and the kept sets of the current micro-batch (one per layer and kind)."""

    def __init__(self, cfg: SATConfig, schedule: OmissionSchedule):
        self.cfg, self.schedule = cfg, schedule
        self.step, self.micro = 0, -1
        self.rate = schedule.rate(0, None)
        self.token_mask: torch.Tensor | None = None
        self.dense_positions: torch.Tensor | None = None  # [batch, tokens] bool: run the whole MLP there
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.forced: dict[tuple[int, str], torch.Tensor] = {}  # fixed kept sets (tests, analysis)
        self.union: dict[tuple[int, str], torch.Tensor] = {}  # kept in any micro-batch of this step
        self.kept_total = {"mlp": [0, 0], "attn": [0, 0]}  # [kept, available] this step

    def start_step(self, step: int, total: int | None) -> None:
        self.step, self.micro = step, -1
        self.rate = self.schedule.rate(step, total)
        self.union.clear()
        self.kept_total = {"mlp": [0, 0], "attn": [0, 0]}

    def begin_forward(self, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None) -> None:
        """Called before every top-level training forward: a new micro-batch."""
        self.micro += 1
        self.cache.clear()
        self.token_mask = attention_mask
        self.dense_positions = None
        if self.cfg.dense_tokens == "labels" and labels is not None:
            predicts = torch.zeros_like(labels, dtype=torch.bool)
            predicts[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
            self.dense_positions = predicts

    def layer_rate(self, layer: int) -> float:
        """This step's omission rate in ``layer`` (the schedule's rate times the layer's ``layer_scale``)."""
        scale = self.cfg.layer_scale.get(layer, 1.0)
        return self.rate if scale == 1.0 else min(self.rate * scale, MAX_LAYER_RATE)

    def active(self, module: nn.Module, kind: str, layer: int) -> bool:
        return module.training and kind in self.cfg.targets and self.layer_rate(layer) > 0

    def _generator(self, layer: int, kind: str) -> torch.Generator:
        key = (((self.cfg.seed * 1_000_003 + self.step) * 10_007 + self.micro) * 1_009 + layer) * 2 + KINDS[
            kind
        ]
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def needs_scores(self, layer: int, kind: str) -> bool:
        """Whether ``kept`` will score this module now (not cached for this micro-batch, not forced)."""
        return (layer, kind) not in self.cache and (layer, kind) not in self.forced

    def kept(
        self, layer: int, kind: str, module: nn.Module, x: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The kept neurons of ``module`` for this micro-batch (the same on a checkpointed recomputation).
        ``scores``: importance already computed by the caller (the ``activation`` metric)."""
        key = (layer, kind)
        if key in self.cache:
            return self.cache[key]
        if key in self.forced:
            idx = self.forced[key].to(x.device)
            w = base_weight(mlp_parts(module)[0] if kind == "mlp" else attn_parts(module)[0])
            n = w.shape[0] if kind == "mlp" else w.shape[0] // module.head_dim
        else:
            if scores is None:
                scores = (mlp_scores if kind == "mlp" else head_scores)(
                    module, x, self.token_mask, self.cfg.metric
                )
            s = _mean_over_ranks(scores)
            n = s.numel()
            floor = self.cfg.min_keep_mlp if kind == "mlp" else self.cfg.min_keep_heads
            idx = choose(
                s,
                n_kept(n, self.layer_rate(layer), floor),
                self.cfg.selection,
                self._generator(*key),
                self.cfg.temperature,
            )
        self.cache[key] = idx
        mask = self.union.setdefault(key, torch.zeros(n, dtype=torch.bool, device=idx.device))
        mask[idx] = True
        self.kept_total[kind][0] += idx.numel()
        self.kept_total[kind][1] += n
        return idx


def _mean_over_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Data parallel: the importance scores averaged over the ranks, so every rank keeps the same neurons (those
    a single process would keep for the whole global batch) and DDP's averaged gradients stay consistent."""
    import torch.distributed as dist

    from slimtune.core.processes import world_size

    world = world_size()
    if world == 1:
        return scores
    total = scores.detach().float().clone()
    dist.all_reduce(total)
    return total.div_(world).to(scores.dtype)


def _sliced_mlp(
    mlp: nn.Module, layer: int, ctrl: SATController, x: torch.Tensor, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """The MLP through this micro-batch's kept channels, scored on the tokens of ``x`` that ``token_mask`` marks
    (with omit=backward, plus the omitted channels' output without grad)."""
    known = scores = None
    reuse = ctrl.cfg.metric == "activation"
    saved, ctrl.token_mask = ctrl.token_mask, token_mask
    try:
        if reuse and ctrl.needs_scores(layer, "mlp"):
            # dense pre-activations: they score the channels and are reused for the kept
            with torch.no_grad():
                gate, up, _, act = mlp_parts(mlp)
                known = (sliced_linear(x, gate), sliced_linear(x, up))
                scores = activation_scores(act(known[0]) * known[1], token_mask)
        kept = ctrl.kept(layer, "mlp", mlp, x, scores)
    finally:
        ctrl.token_mask = saved
    y = mlp_forward(mlp, x, kept, known, reuse)
    if ctrl.cfg.omit == "backward":
        y = y + omitted_mlp_output(mlp, x, kept, known)
    return y


def _split_tokens_mlp(mlp: nn.Module, layer: int, ctrl: SATController, x: torch.Tensor) -> torch.Tensor:
    """dense_tokens=labels: the positions that predict a label token through the whole MLP, the others through
    the kept channels (selected on those other tokens only)."""
    dense = ctrl.dense_positions.reshape(-1)
    flat = x.reshape(-1, x.shape[-1])
    idx_d, idx_s = dense.nonzero().squeeze(1), (~dense).nonzero().squeeze(1)
    mask = ctrl.token_mask
    sparse_mask = None if mask is None else mask.reshape(-1).index_select(0, idx_s).unsqueeze(0)
    ys = _sliced_mlp(mlp, layer, ctrl, flat.index_select(0, idx_s).unsqueeze(0), sparse_mask).squeeze(0)
    yd = type(mlp).forward(mlp, flat.index_select(0, idx_d))
    out = flat.new_zeros(flat.shape).index_copy(0, idx_s, ys).index_copy(0, idx_d, yd)
    return out.reshape(x.shape)


def _patch_mlp(mlp: nn.Module, layer: int, ctrl: SATController) -> None:
    def forward(x):
        if not ctrl.active(mlp, "mlp", layer):
            return type(mlp).forward(mlp, x)
        if ctrl.dense_positions is not None and ctrl.dense_positions.shape == x.shape[:-1]:
            return _split_tokens_mlp(mlp, layer, ctrl, x)
        return _sliced_mlp(mlp, layer, ctrl, x, ctrl.token_mask)

    mlp.forward = forward


def _patch_attention(attn: nn.Module, layer: int, ctrl: SATController) -> None:
    def forward(hidden_states, position_embeddings=None, attention_mask=None, *rest, **kwargs):
        # the KV cache: `past_key_values` up to transformers 5.23, `cache` from 5.24 (keyword, or 4th positional)
        cache = rest[0] if rest else kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache is not None and cache.get_seq_length(attn.layer_idx) > 0
        if cached or not ctrl.active(attn, "attn", layer):
            return type(attn).forward(
                attn, hidden_states, position_embeddings, attention_mask, *rest, **kwargs
            )
        scores = out = None
        if ctrl.cfg.metric == "activation" and ctrl.needs_scores(layer, "attn"):
            with torch.no_grad():  # every head's output norm from a dense no-grad attention pass
                every = torch.arange(
                    base_weight(attn_parts(attn)[0]).shape[0] // attn.head_dim, device=hidden_states.device
                )
                out = attend(attn, hidden_states, position_embeddings, attention_mask, every, **kwargs)
                scores = activation_scores(
                    out.unflatten(-1, (len(every), attn.head_dim)).norm(dim=-1), ctrl.token_mask
                )
        kept = ctrl.kept(layer, "attn", attn, hidden_states, scores)
        y, w = attention_forward(attn, hidden_states, position_embeddings, attention_mask, kept, **kwargs)
        if ctrl.cfg.omit == "backward":
            y = y + omitted_heads_output(
                attn, hidden_states, position_embeddings, attention_mask, kept, out, **kwargs
            )
        return y, w

    attn.forward = forward


def sat_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, kind, module) of every Llama-style MLP and attention module, in model order."""
    out, counts = [], {"mlp": 0, "attn": 0}
    for _, m in model.named_modules():
        kind = "mlp" if is_gated_mlp(m) else "attn" if is_attention(m) else None
        if kind:
            out.append((counts[kind], kind, m))
            counts[kind] += 1
    return out


def remove_sat(model: nn.Module) -> nn.Module:
    """Restore every patched module's own forward (and drop the top-level hook)."""
    for _, _, m in sat_modules(model):
        m.__dict__.pop("forward", None)
    handle = getattr(model, "_sat_hook", None)
    if handle is not None:
        handle.remove()
        del model._sat_hook
    return model


class SATAdapted(Adapted):
    """SAT's state is the controller (this step's rate and kept sets); the parameters are the model's own."""

    cfg: SATConfig

    def self_check(self, data: dict[str, torch.Tensor]) -> None:
        check_slicing(self, data)

    def compile_refusal(self) -> str | None:
        return (
            "it slices each layer to the neurons it keeps, chosen from the data (torch.unique): a "
            "data-dependent shape that breaks the traced graph"
        )

    def __init__(self, model: nn.Module, cfg: SATConfig, controller: SATController):
        super().__init__(model, cfg)
        self.controller = controller
        self.sliced = sat_modules(model)  # (layer, kind, module) of every patched MLP and attention
        # optimizer_mask=freeze_omitted: (parameter, dim, rows, values) restored after the optimizer step
        self._frozen: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        self.extra_state["omission_rate"] = controller.rate
        self.extra_state["schedule"] = [list(r) for r in controller.schedule.rungs]

    def on_step_start(self, step: int) -> None:
        self.controller.start_step(step, self.total_steps)
        self.extra_state["omission_rate"] = self.controller.rate

    def after_backward(self, step: int) -> None:
        """freeze_omitted: remember the rows omitted in every micro-batch of this step (their values survive the
        optimizer step; their Adam moments still decay as for any zero-gradient step)."""
        self._frozen.clear()
        ctrl = self.controller
        if self.cfg.optimizer_mask != "freeze_omitted" or ctrl.rate == 0:
            return
        for layer, kind, m in self.sliced:
            union = ctrl.union.get((layer, kind))
            if union is None:
                continue
            omitted = (~union).nonzero().flatten()
            kv_omitted = None
            if kind == "attn":
                kv_used = union.view(-1, m.num_key_value_groups).any(1)
                kv_omitted = (~kv_used).nonzero().flatten()
            for p, dim, idx in omitted_slices(m, kind, omitted, kv_omitted):
                self._frozen.append((p, dim, idx, p.detach().index_select(dim, idx).clone()))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for p, dim, idx, value in self._frozen:
                p.index_copy_(dim, idx, value)
        self._frozen.clear()

    def on_step_end(self, step: int) -> None:
        for kind, frac in self.kept_fractions().items():
            self.extra_state[f"kept_{kind}"] = round(frac, 4)

    def merge(self) -> nn.Module:
        merged = remove_sat(copy.deepcopy(self.model))
        if self.cfg.lora_r:
            merged = merged.merge_and_unload()
        return merged

    def bench_facts(self, seq_len: int) -> dict:
        from slimtune.methods.sat.selection import speed_limit

        base = self.model.get_base_model() if self.cfg.lora_r else self.model
        return speed_limit(
            base.config, seq_len, self.controller.rate, self.cfg.targets, self.cfg.metric, self.cfg.omit
        )

    def kept_fractions(self) -> dict[str, float]:
        return {k: (a / b if b else 1.0) for k, (a, b) in self.controller.kept_total.items()}


def _with_lora(model: nn.Module, cfg: SATConfig) -> nn.Module:
    """lora_r > 0: peft LoRA on every linear but the head (the base frozen); sliced with their base."""
    from slimtune.methods.baselines.apply import peft_lora
    from slimtune.methods.baselines.config import LoraMethodConfig

    lcfg = LoraMethodConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=["all-linear"])
    return peft_lora(model, lcfg)


def _require_sliceable(model: nn.Module, cfg: SATConfig) -> None:
    """One line naming the module type SAT cannot slice (fused or non-gated MLPs, fused q/k/v projections)."""
    found = {k for _, k, _ in sat_modules(model)}
    layers = decoder_layers(model)
    needed = {
        "mlp": "a gated MLP (gate_proj/up_proj/down_proj, or a fused gate_up_proj)",
        "attn": "an attention with q/k/v/o projections (separate, or a fused qkv_proj)",
    }
    for kind in cfg.targets:
        if kind not in found:
            child = getattr(layers[0], "mlp" if kind == "mlp" else "self_attn", None)
            if child is None:
                child = next((c for n, c in layers[0].named_children() if "att" in n), layers[0])
            raise UserError(
                f"method sat: cannot slice {type(child).__name__} ({type(model).__name__}): SAT needs "
                f"{needed[kind]}"
                + (
                    "; set method.targets: [mlp] to omit MLP channels only"
                    if kind == "attn" and "mlp" in found
                    else ""
                )
            )


def apply_sat(model: nn.Module, cfg: SATConfig) -> SATAdapted:
    _require_sliceable(model, cfg)
    if cfg.lora_r:
        model = _with_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    ctrl = SATController(cfg, from_config(cfg))
    for layer, kind, m in sat_modules(model):
        (_patch_mlp if kind == "mlp" else _patch_attention)(m, layer, ctrl)

    def pre_forward(module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            ctrl.begin_forward(mask, kwargs.get("labels"))

    model._sat_hook = model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    return SATAdapted(model, cfg, ctrl)


def check_slicing(a: SATAdapted, data: dict[str, torch.Tensor]) -> None:
    """SAT's sliced forward and backward with fixed kept sets (every other MLP channel and query head) equal the
    dense model's with the omitted channels' and heads' outputs zeroed (their down_proj / o_proj columns), the
    gradients of those zeroed columns aside (SAT gives them none)."""
    ref = remove_sat(copy.deepcopy(a.model))
    skip: dict[str, torch.Tensor] = {}  # parameter name -> columns whose gradient differs by design
    names = {id(p): n for n, p in ref.named_parameters()}
    for layer, kind, m in sat_modules(ref):
        out = mlp_parts(m)[2] if kind == "mlp" else attn_parts(m)[3]
        width = 1 if kind == "mlp" else m.head_dim
        omitted = torch.arange(1, out.weight.shape[1] // width, 2)
        cols = (omitted[:, None] * width + torch.arange(width)).flatten()
        with torch.no_grad():
            out.weight[:, cols] = 0
        skip[names[id(out.weight)]] = cols
        a.controller.forced[(layer, kind)] = torch.arange(0, out.weight.shape[1] // width, 2)
    a.model.train()
    ref.train()
    got, want = a.model(**data), ref(**data)
    if not torch.allclose(got.logits, want.logits, atol=1e-5):
        raise AssertionError("sliced forward differs from the zeroed dense one")
    got.loss.backward()
    want.loss.backward()
    for (name, p), (_, q) in zip(a.model.named_parameters(), ref.named_parameters(), strict=True):
        g, h = p.grad.clone(), q.grad.clone()
        if name in skip:
            g[:, skip[name]] = h[:, skip[name]] = 0
        if not torch.allclose(g, h, atol=1e-5):
            raise AssertionError(f"gradient of {name} differs from the zeroed dense model's")
