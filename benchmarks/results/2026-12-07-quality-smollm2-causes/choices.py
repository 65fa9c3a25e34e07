"""Why a run's sentiment accuracy is what it is: its choice scores on the full held-out set (500 reviews),
split by the reference label, for trained runs of the comparison and the base model.

    .venv/bin/python benchmarks/results/2026-12-07-quality-smollm2-causes/choices.py RUN_DIR... > choices.json
    (a RUN_DIR of `base` scores the untrained model; RUN_DIR@alpha1 a QST run with its output mix alpha set to 1,
    i.e. its 4-bit backbone alone; RUN_DIR@noside a QST run with its side network's upsample U zeroed, i.e. the
    trained alpha scaling the backbone's final state alone)
"""

import json
import sys

import torch

from slimtune.data.records import IGNORE, collate
from slimtune.data.tasks import TASKS
from slimtune.recipes import train as api
from slimtune.training.evaluate import _ids, _prompts

task = TASKS["sentiment"]
_, records = task.load(0)
out = {}
for run in sys.argv[1:]:
    path, _, variant = run.partition("@")
    _, p = api.load_target(None, "smollm2-135m") if path == "base" else api.load_target(path, None)
    a, tok = p.adapted, p.tok
    changed = 0
    with torch.no_grad():
        for name, param in a.model.named_parameters():
            if variant == "alpha1" and name.endswith("qst.alpha"):
                param.fill_(1.0)
                changed += 1
            if variant == "noside" and (name.endswith("qst.up.weight") or name.endswith("qst.up.bias")):
                param.zero_()
                changed += 1
    assert changed == {"": 0, "alpha1": 1, "noside": 2}[variant], (run, changed)
    a.model.eval()
    eos = [tok.eos_token_id]
    choice_ids = [_ids(tok, c) + eos for c in task.choices]
    rows = []  # (prompt + choice + end token, labels on the choice and end token), choices of a review adjacent
    for prompt in _prompts(tok, records):
        pr = _ids(tok, prompt)
        rows += [(pr + c, [IGNORE] * len(pr) + c) for c in choice_ids]
    flat = []  # summed log-prob of each row's labelled tokens
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            b = collate(rows[i : i + 16], tok.pad_token_id)
            logp = a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            logp, labels = logp[:, :-1].log_softmax(-1), b["labels"][:, 1:]
            picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            flat += (picked * (labels != IGNORE)).sum(-1).tolist()
    k = len(task.choices)
    scores = [flat[n * k : (n + 1) * k] for n in range(len(records))]
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
