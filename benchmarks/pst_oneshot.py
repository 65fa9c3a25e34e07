"""One-shot pruning of every attention/MLP linear of a model to 50%, no training: which data-free score and which
comparison group lose least? The scores PST can start from (magnitude |W|, or |W|·rms(x) with `score_prior:
wanda`) ranked within the whole layer (`scope: local`), within each output row (`scope: row`), within each input
column, and as 2:4.

    .venv/bin/python benchmarks/pst_oneshot.py [MODEL] [TASK]     # defaults: smollm2-135m sentiment

Input RMS comes from 64 training examples; the loss is the task's eval loss on 200 held-out examples (the same
split `slimtune train` uses). Uses the library's mask functions, so it measures exactly what PST computes.
"""

from __future__ import annotations

import sys

import torch

from slimtune.data.records import load_split
from slimtune.methods.base import Adapted, MethodConfig
from slimtune.methods.pst.layer import nm_mask, row_topk_mask, topk_mask
from slimtune.models import loading as models
from slimtune.training import config as C
from slimtune.training.evaluate import eval_loss


@torch.no_grad()
def main(model_name: str = "smollm2-135m", task: str = "sentiment", sparsity: float = 0.5) -> None:
    torch.manual_seed(0)
    model, tok = models.load(model_name, "float32", device="cpu")
    model.eval()
    train, held_out, _, _ = load_split(C.DataConfig(task=task, max_length=128, eval_size=200), tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("_proj")
    }
    sq = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def record(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sq[name] += (x * x).sum(0)

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    for i in range(0, 64, 8):
        rows = train.input_ids[i : i + 8]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    w0 = {n: m.weight.detach().clone() for n, m in linears.items()}
    rms = {n: sq[n].sqrt() for n in linears}
    adapted = Adapted(model, MethodConfig())
    print(f"{model_name} on {task}: dense eval loss {eval_loss(adapted, held_out, 8, pad):.3f}", flush=True)
    rules = {
        "magnitude, layer": lambda n, w: topk_mask(w.abs(), sparsity),
        "magnitude, row": lambda n, w: row_topk_mask(w.abs(), sparsity),
        "wanda, layer": lambda n, w: topk_mask(w.abs() * rms[n], sparsity),
        "wanda, row": lambda n, w: row_topk_mask(w.abs() * rms[n], sparsity),
        "wanda, input column": lambda n, w: row_topk_mask((w.abs() * rms[n]).T, sparsity).T,
        "magnitude, 2:4": lambda n, w: nm_mask(w.abs(), 2, 4),
        "wanda, 2:4": lambda n, w: nm_mask(w.abs() * rms[n], 2, 4),
    }
    for label, rule in rules.items():
        for n, m in linears.items():
            m.weight.copy_(w0[n] * rule(n, w0[n]).to(w0[n].dtype))
        print(f"{label:22} eval loss {eval_loss(adapted, held_out, 8, pad):.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
