"""The model owner's side of PEMA: it keeps the model private and answers requests.

What crosses the boundary, and nothing else:
- to the data owner: final-layer states f (the last decoder layer's output, *before* the final norm) [B, d], the
  next-token logits [B, V], the greedy tokens it produced itself, and once the ``HeadBundle`` (final norm weight
  and eps, LM head matrix — for a tied model such as SmolLM2 that matrix is also the input embedding table);
- from the data owner: prompt token ids and the tokens the data owner picked during generation (and, only in the
  opt-in teacher-forced memory mode, the gold targets). Every id received is logged in ``received``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadBundle:
    """The frozen head the data owner receives once: logits = W · RMSNorm(f) (RMSNorm weight, eps)."""

    weight: torch.Tensor  # [V, d]
    norm_weight: torch.Tensor  # [d]
    eps: float

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        return self.norm_weight.float() * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.norm(f) @ self.weight.float().t()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"head.weight": self.weight, "head.norm_weight": self.norm_weight}


@dataclass
class Session:
    past: object
    mask: torch.Tensor  # [B, T] attention mask so far
    done: torch.Tensor = field(default=None)


class Owner:
    """Wraps the full causal LM (never handed out)."""

    def __init__(self, model: nn.Module, pad_id: int):
        self._model = model.eval()
        self._pad = pad_id
        self.received: list[list[int]] = []  # every token id sequence received, in order
        self._state: torch.Tensor | None = None
        last = self._model.model.layers[-1]
        self._hook = last.register_forward_hook(self._capture)

    def _capture(self, module, args, out):
        self._state = (out[0] if isinstance(out, tuple) else out).detach()

    def export_head(self) -> HeadBundle:
        norm = self._model.model.norm
        return HeadBundle(
            self._model.get_output_embeddings().weight.detach().clone().float(),
            norm.weight.detach().clone().float(),
            float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        )

    @torch.no_grad()
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, past
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        # positions from the mask, as HF generate does for left-padded batches
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
        )
        return self._state, out.logits.float(), out.past_key_values

    def begin(self, prompts: list[list[int]]) -> tuple[Session, torch.Tensor, torch.Tensor]:
        """Left-pad and run the prompts; returns the session and (f, logits) of each prompt's last position."""
        self.received.extend(list(p) for p in prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        dev = next(self._model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        f, logits, past = self._forward(ids, mask, None)
        return Session(past, mask), f[:, -1], logits[:, -1]

    def step(self, session: Session, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one token per sequence; returns (f, logits) at the new position."""
        self.received.append(tokens.tolist())
        session.mask = torch.cat([session.mask, torch.ones_like(session.mask[:, :1])], dim=1)
        f, logits, session.past = self._forward(
            tokens[:, None].to(session.mask.device), session.mask, session.past
        )
        return f[:, -1], logits[:, -1]

    @torch.no_grad()
    def greedy_trajectory(
        self, prompts: list[list[int]], max_new: int, stop_ids: set[int]
    ) -> list[tuple[torch.Tensor, list[int]]]:
        """The owner's own greedy continuation: per prompt, states f(c_1..c_G) [G, d] and its tokens ŵ_1..ŵ_G
        (f(c_1) is the prompt's last state; generation stops after a stop token or ``max_new`` tokens)."""
        session, f, logits = self.begin(prompts)
        states, tokens = [[] for _ in prompts], [[] for _ in prompts]
        alive = [True] * len(prompts)
        for _ in range(max_new):
            nxt = logits.argmax(-1)
            for i in range(len(prompts)):
                if alive[i]:
                    states[i].append(f[i].float().cpu())
                    tokens[i].append(int(nxt[i]))
                    alive[i] = int(nxt[i]) not in stop_ids
            if not any(alive):
                break
            f, logits = self._step_own(session, nxt)
        return [(torch.stack(s), t) for s, t in zip(states, tokens)]

    def _step_own(self, session: Session, tokens: torch.Tensor):
        """Append the owner's own tokens (not a request from the data owner: not logged as received)."""
        session.mask = torch.cat([session.mask, torch.ones_like(session.mask[:, :1])], dim=1)
        f, logits, session.past = self._forward(tokens[:, None], session.mask, session.past)
        return f[:, -1], logits[:, -1]

    @torch.no_grad()
    def teacher_forced_states(self, prompts: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        """States along prompt + gold target (the targets are disclosed to the owner and logged)."""
        out = []
        for p, t in zip(prompts, targets):
            self.received.append(list(p) + list(t))
            ids = torch.tensor([list(p) + list(t)], device=next(self._model.parameters()).device)
            f, _, _ = self._forward(ids, torch.ones_like(ids), None)
            out.append(f[0, len(p) - 1 :].float().cpu())  # f(c_1) .. f(c_{T+1})
        return out
