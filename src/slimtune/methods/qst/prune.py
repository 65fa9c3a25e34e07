"""``init: backbone``: start QST's side network from a structured pruning of the backbone (as Ladder Side-Tuning
does) instead of random weights (as the QST paper does).

The side network is the backbone's own decoder layer at width d/r with the same number of heads, so every side
tensor is a sub-block of the backbone tensor of the same name. What is kept is chosen by a data-free magnitude
score (the squared L2 norm of every weight that reads or writes a unit):

- residual channels (one set for all layers, since the residual stream is shared): per channel, the squared
  column norms of every linear that reads the stream (q, k, v, gate, up) plus the squared row norms of every linear
  that writes it (o, down), summed over layers; the top d/r are kept;
- per layer, query/key dimensions (one set for every head, so per-head q/k norms can be sliced too): rotary pairs
  (j, j + head_dim/2) are scored together (the squared norms of the q and k rows of both dimensions, summed over
  heads) and the top head_dim_s/2 pairs kept, so dimensions that rotate together stay together;
- per layer, value dimensions: squared v rows plus squared o columns, summed over heads;
- per layer, FFN neurons: squared gate and up rows plus the squared down column.

Norm weights are sliced the same way; the final norm keeps the residual channels. The downsamples, gates, U and
alpha keep their own initialisation (so the model still starts exactly at the base model: alpha = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.modules.arch import decoder_layers, final_norm

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported(model: nn.Module) -> str | None:
    """Why ``init: backbone`` cannot prune this model's layers (None when it can)."""
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [f"self_attn.{n}" for n in ATTENTION if not isinstance(getattr(attn, n, None), nn.Linear)]
        names += [f"mlp.{n}" for n in MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if names:
            return (
                f"{type(layer).__name__} has no separate {', '.join(names)} linear layers (fused or non-gated "
                "blocks are not pruned); use method.init=random"
            )
    return None


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.topk(k).indices.sort().values


def _sq(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.detach().float().pow(2).sum(dim)


def _pairs(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep ``keep`` dimensions of a head, rotary pairs (j, j + hd/2) together when ``keep`` is even."""
    hd = score.numel()
    if keep % 2 or hd % 2:
        return _top(score, keep)
    half = _top(score[: hd // 2] + score[hd // 2 :], keep // 2)
    return torch.cat([half, half + hd // 2])


def _expand(dims: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Row indices of ``dims`` within each of ``heads`` blocks of ``hd`` rows."""
    return (torch.arange(heads)[:, None] * hd + dims[None, :]).flatten()


def _hidden_score(model: nn.Module) -> torch.Tensor:
    score = 0
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            score = score + _sq(lin.weight, 0)
        score = score + _sq(attn.o_proj.weight, 1) + _sq(mlp.down_proj.weight, 1)
    return score


def _layer_index(layer: nn.Module, config, side_config) -> dict[str, torch.Tensor]:
    """Which rows of q/k/v, columns of o, and FFN neurons of one backbone layer the side layer keeps."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.q_proj.out_features // heads
    q, k = _sq(attn.q_proj.weight, 1).view(heads, hd), _sq(attn.k_proj.weight, 1).view(kv, hd)
    qk = _pairs(q.sum(0) + k.sum(0), side_config.head_dim)
    v = _sq(attn.v_proj.weight, 1).view(kv, hd).sum(0) + _sq(attn.o_proj.weight, 0).view(heads, hd).sum(0)
    vd = _top(v, side_config.head_dim)
    ff = _sq(mlp.gate_proj.weight, 1) + _sq(mlp.up_proj.weight, 1) + _sq(mlp.down_proj.weight, 0)
    return {
        "hd": hd,
        "qk": qk,
        "q": _expand(qk, heads, hd),
        "k": _expand(qk, kv, hd),
        "v": _expand(vd, kv, hd),
        "o": _expand(vd, heads, hd),
        "ff": _top(ff, side_config.intermediate_size),
    }


def _slice_linear(name: str, tensor: torch.Tensor, idx: dict, hidden: torch.Tensor) -> torch.Tensor:
    rows = {"q_proj": idx["q"], "k_proj": idx["k"], "v_proj": idx["v"], "o_proj": hidden}
    rows.update({"gate_proj": idx["ff"], "up_proj": idx["ff"], "down_proj": hidden})
    cols = {"o_proj": idx["o"], "down_proj": idx["ff"]}
    out = tensor.index_select(0, rows[name])
    return out.index_select(1, cols.get(name, hidden)) if tensor.dim() == 2 else out


def _slice_vector(module_name: str, tensor: torch.Tensor, idx: dict, hidden: torch.Tensor) -> torch.Tensor:
    """A norm's weight or bias: over the residual stream, one head (per-head q/k norms), or all q/k heads."""
    leaf = module_name.rsplit(".", 1)[-1]
    for part in ("q", "k"):
        if leaf.startswith(f"{part}_") and "norm" in leaf:
            return tensor.index_select(0, idx["qk"] if tensor.numel() == idx["hd"] else idx[part])
    return tensor.index_select(0, hidden)


def pruned_side_state(model: nn.Module, side_config) -> dict[str, torch.Tensor]:
    """The side network's decoder layers and final norm, cut out of ``model`` (keys as in the side model)."""
    hidden = _top(_hidden_score(model), side_config.hidden_size)
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(decoder_layers(model)):
        idx = _layer_index(layer, model.config, side_config)
        modules = dict(layer.named_modules())
        for pname, p in layer.named_parameters():
            mod_name, _, kind = pname.rpartition(".")
            leaf = mod_name.rsplit(".", 1)[-1]
            t = p.detach()
            if leaf in ATTENTION + MLP:
                out = _slice_linear(leaf, t, idx, hidden)
            elif t.dim() == 1 and not isinstance(modules[mod_name], nn.Linear):
                out = _slice_vector(mod_name, t, idx, hidden)
            else:
                raise ValueError(f"method.init: cannot prune {pname} of {type(layer).__name__}")
            state[f"layers.{i}.{pname}"] = out.clone()
    for pname, p in final_norm(model).named_parameters():
        state[f"norm.{pname}"] = p.detach().index_select(0, hidden).clone()
    return state
