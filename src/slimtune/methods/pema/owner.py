"""The model owner's side of PEMA: it keeps the model private and answers requests.

What crosses the boundary, and nothing else:
- to the data owner: final-layer states f (the last decoder layer's output, *before* the final norm) [B, d], the
  next-token logits [B, V], the greedy tokens it produced itself, and once the ``HeadBundle`` (final norm weight,
  bias, eps and kind, the logit multiplier and soft-cap, LM head matrix — for a tied model such as SmolLM2 that
  matrix is also the input embedding table);
- from the data owner: prompt token ids and the tokens the data owner picked during generation (and, only in the
  opt-in teacher-forced memory mode, the gold targets). Every id received is logged in ``received``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.errors import UserError
from slimtune.modules.arch import cache_keyword, decoder_layers, final_norm, logit_postprocessing

NORM_KINDS = ("rms", "rms_offset", "layer")
"""rms: w · x / rms(x) (Llama, Qwen, OLMo 2 ...); rms_offset: (1 + w) · x / rms(x) (Gemma); layer: LayerNorm."""


@dataclass
class HeadBundle:
    """The frozen head the data owner receives once: logits = post(W · Norm(f)), with the final norm's weight
    (and bias), eps and kind, and the family's logit multiplier and soft-cap (``post``)."""

    weight: torch.Tensor  # [V, d]
    norm_weight: torch.Tensor  # [d]
    eps: float
    norm_kind: str = "rms"
    norm_bias: torch.Tensor | None = None  # [d], LayerNorm only
    mult: float = 1.0
    cap: float | None = None

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        h32, w = h.float(), self.norm_weight.float()
        if self.norm_kind == "layer":
            bias = self.norm_bias.float() if self.norm_bias is not None else None
            return F.layer_norm(h32, (h32.shape[-1],), w, bias, self.eps)
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (1.0 + w) * normed if self.norm_kind == "rms_offset" else w * normed

    def post(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mult != 1.0:
            logits = logits * self.mult
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.post(self.norm(f) @ self.weight.float().t())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"head.weight": self.weight, "head.norm_weight": self.norm_weight}
        if self.norm_bias is not None:
            out["head.norm_bias"] = self.norm_bias
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "eps": str(self.eps),
            "norm_kind": self.norm_kind,
            "mult": str(self.mult),
            "cap": str(self.cap),
        }

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> HeadBundle:
        cap = meta.get("cap", "None")
        return cls(
            tensors["head.weight"],
            tensors["head.norm_weight"],
            float(meta["eps"]),
            meta.get("norm_kind", "rms"),
            tensors.get("head.norm_bias"),
            float(meta.get("mult", 1.0)),
            None if cap == "None" else float(cap),
        )


def _norm_kind(norm: nn.Module, eps: float) -> str | None:
    """Which of :data:`NORM_KINDS` ``norm`` computes (probed on random vectors), or None."""
    weight = norm.weight.detach().float()
    x = torch.randn(4, weight.shape[0], device=weight.device)
    want = norm(x.to(norm.weight.dtype)).float()
    bias = getattr(norm, "bias", None)
    for kind in NORM_KINDS:
        bundle = HeadBundle(weight, weight, eps, kind, bias.detach().float() if bias is not None else None)
        if torch.allclose(bundle.norm(x), want, atol=1e-3, rtol=1e-3):
            return kind
    return None


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
        last = decoder_layers(self._model)[-1]
        self._hook = last.register_forward_hook(self._capture)

    def _capture(self, module, args, out):
        self._state = (out[0] if isinstance(out, tuple) else out).detach()

    @torch.no_grad()
    def export_head(self) -> HeadBundle:
        """The head bundle, checked: its logits from this model's final-layer states equal the model's own."""
        model = self._model
        norm = final_norm(model)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        kind = _norm_kind(norm, eps)
        if kind is None:
            raise UserError(f"pema: the final norm {type(norm).__name__} is none of {', '.join(NORM_KINDS)}")
        bias = getattr(norm, "bias", None)
        mult, cap = logit_postprocessing(model.config)
        head = HeadBundle(
            model.get_output_embeddings().weight.detach().clone().float(),
            norm.weight.detach().clone().float(),
            eps,
            kind,
            bias.detach().clone().float() if bias is not None else None,
            mult,
            cap,
        )
        ids = torch.arange(3, 11, device=next(model.parameters()).device)[None] % head.weight.shape[0]
        want = model(input_ids=ids).logits.float()
        err = float((head.logits(self._state) - want).abs().max())
        if err > 1e-3 * (float(want.abs().max()) + 1e-6):
            raise UserError(
                f"pema: {type(model).__name__}'s logits are not the exported head's (max |difference| {err:.3g}); "
                "the data owner could not reproduce them"
            )
        return head

    @torch.no_grad()
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, past
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        # positions from the mask, as HF generate does for left-padded batches
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        cache = {cache_keyword(self._model.forward): past}
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
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
