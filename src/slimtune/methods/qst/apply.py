"""``apply(model, QSTConfig) -> QSTAdapted``: quantize and freeze the backbone, attach the side network."""

from __future__ import annotations

import torch
from torch import nn

from slimtune.core.errors import ConfigError, UserError
from slimtune.methods.base import Adapted
from slimtune.methods.qst.config import QSTConfig
from slimtune.methods.qst.layer import QSTModel, check_shape, side_config
from slimtune.methods.qst.prune import pruned_side_state, unsupported
from slimtune.modules.arch import head_mismatch
from slimtune.modules.quant.backbone import quantize_decoder


class QSTAdapted(Adapted):
    """The side network is the method's whole state; the backbone is the (4-bit) base model, untouched."""

    model: QSTModel

    def compile_refusal(self) -> str | None:
        return (
            "it runs the 4-bit backbone without autograd and trains a side network outside the decoder "
            "layers; nothing of its training step is in them"
        )

    def loss_head(self) -> None:
        return None  # the side network's forward forms its own logit-free loss through the frozen head

    def merge(self) -> nn.Module:
        raise NotImplementedError(
            "QST cannot be merged: its side network is a separate model that reads every "
            "backbone layer, not a change to the backbone's weights"
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int | None,
    ) -> torch.Tensor:
        """Greedy decoding with both KV caches (backbone and side) advanced each step."""
        model = self.model
        cache = model.new_cache()
        ids, mask = input_ids, attention_mask
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, cache=cache).logits[:, -1]
            nxt = logits.argmax(-1)
            if pad_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            new.append(nxt)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if bool(done.all()):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(new, dim=1) if new else input_ids[:, :0]


def _pruned(model: nn.Module, cfg: QSTConfig) -> dict[str, torch.Tensor]:
    reason = unsupported(model)
    if reason:
        raise UserError(f"method.init: backbone: {reason}")
    return pruned_side_state(model, side_config(model.config, cfg.r))


def apply_qst(model: nn.Module, cfg: QSTConfig) -> QSTAdapted:
    problems = check_shape(model.config, cfg.r)
    if problems:
        raise ConfigError(problems)
    mismatch = head_mismatch(model)
    if mismatch:
        raise UserError(
            f"method qst: {type(model).__name__}'s logits are not lm_head(final hidden state) with a known "
            f"scaling or soft-cap ({mismatch}); QST applies the frozen head itself and cannot follow it"
        )
    pruned = _pruned(model, cfg) if cfg.init == "backbone" else None  # before the weights are quantized
    if cfg.quantize:
        quantize_decoder(model, cfg.backend, cfg.double_quant)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # the backbone never trains (no dropout in it either)
    wrapped = QSTModel(model, cfg)
    device = next(model.parameters()).device
    if pruned is not None:
        missing, unexpected = wrapped.qst.side.load_state_dict(pruned, strict=False)
        params = {n for n, _ in wrapped.qst.side.named_parameters()}
        if unexpected or params & set(missing):
            raise UserError(
                f"method.init: backbone: side tensors not matched: {sorted(params & set(missing))}"
            )
    wrapped.qst.to(device)
    return QSTAdapted(wrapped, cfg)
