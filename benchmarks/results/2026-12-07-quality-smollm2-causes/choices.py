"""Why a run's sentiment accuracy is what it is: its choice scores on the full held-out set (500 reviews),
split by the reference label, for trained runs of the comparison and the base model.

    .venv/bin/python benchmarks/results/2026-12-07-quality-smollm2-causes/choices.py RUN_DIR... > choices.json
    (a RUN_DIR of `base` scores the untrained model)
"""

import json
import sys

import torch

from slimtune.data.tasks import TASKS
from slimtune.recipes import train as api
from slimtune.training.evaluate import _ids, _prompts

task = TASKS["sentiment"]
_, records = task.load(0)
out = {}
for run in sys.argv[1:]:
    _, p = api.load_target(None, "smollm2-135m") if run == "base" else api.load_target(run, None)
    a, tok = p.adapted, p.tok
    a.model.eval()
    eos = [tok.eos_token_id]
    choice_ids = [_ids(tok, c) + eos for c in task.choices]
    scores = []  # [n, choices]: summed log-prob of each choice (and the end token) after the prompt
    with torch.no_grad():
        for prompt in _prompts(tok, records):
            pr = _ids(tok, prompt)
            row = []
            for c in choice_ids:
                ids = torch.tensor([pr + c])
                logp = a.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                tgt = ids[0, 1:]
                row.append(float(logp[len(pr) - 1 :].gather(-1, tgt[len(pr) - 1 :, None]).sum()))
            scores.append(row)
    s = torch.tensor(scores)
    pred = s.argmax(1)
    gold = torch.tensor([task.choices.index(r["output"]) for r in records])
    res = {"n": len(records), "accuracy": float((pred == gold).float().mean())}
    for j, name in enumerate(task.choices):
        sel = gold == j
        res[f"recall_{name.strip()}"] = float((pred[sel] == j).float().mean())
        res[f"predicted_{name.strip()}"] = float((pred == j).float().mean())
        res[f"mean_logp_{name.strip()}_when_gold"] = float(s[sel, j].mean())
    margin = s[torch.arange(len(gold)), gold] - s[torch.arange(len(gold)), 1 - gold]
    res["mean_margin_gold_minus_other"] = float(margin.mean())
    res["choice_token_counts"] = [len(c) for c in choice_ids]
    out[run] = res
    print(run, json.dumps(res), file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
