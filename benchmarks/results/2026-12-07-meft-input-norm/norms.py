"""Mean L2 norm of every decoder layer's MLP input (non-padding tokens) on 16 training rows of each task, for
SmolLM2-135M and Qwen2.5-Coder-0.5B: the quantity MEFT's adapter update scales with (squared).

    .venv/bin/python benchmarks/results/2026-12-07-meft-input-norm/norms.py > .../norms.json
"""

import json

import torch

from slimtune.data.records import collate, encode_records
from slimtune.data.tasks import TASKS
from slimtune.models.loading import load
from slimtune.modules.arch import layer_mlps

out = {}
for model_name in ("smollm2-135m", "qwen2.5-coder-0.5b"):
    model, tok = load(model_name, dtype="float32")
    model.eval()
    out[model_name] = {}
    for task in ("sentiment", "trivia", "translate-en-de"):
        train, _ = TASKS[task].load(0)
        enc = encode_records(tok, list(enumerate(train[:16], 1)), "instruction", 128, task)
        b = collate(list(zip(enc.input_ids, enc.labels)), tok.pad_token_id)
        norms = []
        hooks = [
            m.register_forward_pre_hook(lambda m, a: norms.append(a[0].detach()[b["attention_mask"].bool()]))
            for m in layer_mlps(model)
        ]
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in hooks:
            h.remove()
        per_layer = [round(float(x.norm(dim=-1).mean()), 2) for x in norms]
        out[model_name][task] = per_layer
print(json.dumps(out, indent=1))
