"""The data owner's side of PEMA: the external memory, the adapter, its losses, Gradual Unrolling and the mixing
of distributions. Nothing here holds decoder weights: only the owner's ``HeadBundle``, memory rows and the adapter
(tested by walking every tensor the objects reach). The two training stages and generation run in
:mod:`slimtune.recipes.pema`.

Adapter (no residual): z = s·A·drop(x), s = α/r;  h_rct = B_rct z;  h_pd = B_pd z;
P_PEMA(w | c) = softmax(W · RMSNorm(h_pd)) with the owner's frozen head.
Stage 1: (A₁, B_rct) minimise MSE(h_rct, x). Stage 2: B_rct frozen, fresh A₂ and B_pd minimise
κ·MSE(B_rct s A₂ drop(x), x) + (1 − κ)·CE(W · RMSNorm(B_pd s A₂ drop(x)), y). Deployed: (A₂, B_pd).
Generation mixes in log space before any other logits processing: log P = logsumexp(log(1−λ) + log P_LM,
log λ + log P_PEMA), λ from Gradual Unrolling λ(0) = λ_max, λ(t) = (λ_max·(1 − min(t, L−1)/L))², per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.methods.pema.config import PEMAConfig
from slimtune.methods.pema.owner import HeadBundle, Owner
from slimtune.modules.losses import IGNORE, frozen_head_rows_cross_entropy


@dataclass
class ExternalMemory:
    keys: torch.Tensor  # [N, d] float32: the owner's states
    values: torch.Tensor  # [N] int64: the data owner's target tokens

    def save(self, path: Path) -> None:
        save_file({"keys": self.keys.contiguous(), "values": self.values.contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> ExternalMemory:
        t = load_file(str(path))
        return cls(t["keys"], t["values"])

    def nbytes(self) -> int:
        return self.keys.numel() * 4 + self.values.numel() * 8


def build_memory(
    owner: Owner,
    prompts: list[list[int]],
    targets: list[list[int]],
    cfg: PEMAConfig,
    stop_id: int,
    batch_size: int = 16,
) -> ExternalMemory:
    """Rows (f(c_t), y_t). free_running: c_t follows the owner's own greedy tokens, y_t the gold token at the same
    position (t ≤ min(T, G)); teacher_forced: c_t = prompt + y_<t. With ``append_stop_target`` one more row pairs
    the state after T tokens with the stop token (when the owner's trajectory reaches it)."""
    keys, values = [], []
    for start in range(0, len(prompts), batch_size):
        p, y = prompts[start : start + batch_size], targets[start : start + batch_size]
        if cfg.memory_mode == "teacher_forced":
            states = owner.teacher_forced_states(p, y)
        else:
            states = [s for s, _ in owner.greedy_trajectory(p, cfg.max_new_tokens, {stop_id})]
        for f, gold in zip(states, y):
            n = min(len(gold), f.shape[0])
            keys.append(f[:n])
            values.append(torch.tensor(gold[:n], dtype=torch.long))
            if cfg.append_stop_target and f.shape[0] > len(gold):
                keys.append(f[len(gold) : len(gold) + 1])
                values.append(torch.tensor([stop_id]))
    return ExternalMemory(torch.cat(keys).float(), torch.cat(values))


class PEMAAdapter(nn.Module):
    """A (r x d), B_rct (d x r), B_pd (d x r); LoRA-style init (A kaiming-uniform, B = 0)."""

    def __init__(self, d: int, cfg: PEMAConfig):
        super().__init__()
        self.scale = cfg.alpha / cfg.r
        self.drop = nn.Dropout(cfg.dropout)
        self.pema_A = nn.Parameter(torch.empty(cfg.r, d))
        self.pema_B_rct = nn.Parameter(torch.zeros(d, cfg.r))
        self.pema_B_pd = nn.Parameter(torch.zeros(d, cfg.r))
        nn.init.kaiming_uniform_(self.pema_A, a=math.sqrt(5))
        self.register_buffer("key_scale", torch.ones(()))

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(self.drop(x * self.key_scale), self.pema_A)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.z(x), self.pema_B_rct)

    def predict_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.z(x), self.pema_B_pd)


def reconstruction_loss(adapter: PEMAAdapter, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(adapter.reconstruct(x), x * adapter.key_scale)


PD_CHUNK = 128  # rows per logits block (128 x 49,152 fp32 = 25 MB); smaller blocks re-read the head more often: slower


def prediction_loss(adapter: PEMAAdapter, head: HeadBundle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of P_PEMA through the frozen head: chunked and logit-free (a logit multiplier folded into
    the normed state), or through full logits when the family soft-caps them (Gemma)."""
    h = head.norm(adapter.predict_hidden(x))
    if head.cap is not None:
        return F.cross_entropy(head.post(h @ head.weight.float().t()), y, ignore_index=IGNORE)
    h = h * head.mult if head.mult != 1.0 else h
    return frozen_head_rows_cross_entropy(h, head.weight, y, chunk=PD_CHUNK)


def gu_lambda(t: int, lambda_max: float, horizon: int, minimum: float = 0.0) -> float:
    """Gradual Unrolling: λ(0) = λ_max, λ(t) = (1 − m)(λ_max (1 − min(t, L−1)/L))² + m for t ≥ 1 (per
    sequence); m is the reference's minimum share (0 in the paper)."""
    if t == 0:
        return lambda_max
    return (1 - minimum) * (lambda_max * (1 - min(t, horizon - 1) / horizon)) ** 2 + minimum


def mix_log_probs(lp_lm: torch.Tensor, lp_pema: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log(λ P_PEMA + (1 − λ) P_LM) per row; rows with λ = 0 return ``lp_lm`` exactly, λ = 1 ``lp_pema``."""
    lam = lam.to(lp_lm.dtype)[:, None]
    mixed = torch.logaddexp(
        torch.log1p(-lam.clamp(max=1 - 1e-12)) + lp_lm, torch.log(lam.clamp(min=1e-30)) + lp_pema
    )
    out = torch.where(lam == 0, lp_lm, mixed)
    return torch.where(lam == 1, lp_pema, out)
