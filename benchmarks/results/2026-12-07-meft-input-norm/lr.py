"""MEFT's learning rate with and without `method.input_norm`: each shipped MEFT config (trivia) for 12 steps of
4 rows (<= 96 tokens), `on_nonfinite: stop`, at the lr and input_norm of each row below. Run from the repository
root: .venv/bin/python benchmarks/results/2026-12-07-meft-input-norm/lr.py OUT  (resumable: finished runs are read)"""

import json
import statistics
import sys
from pathlib import Path

from slimtune.recipes import train as api
from slimtune.training import config as C

out = Path(sys.argv[1])
CASES = [  # (config, lr, input_norm)
    ("configs/meft/smollm2-135m.yaml", 1e-3, 0.0),
    ("configs/meft/smollm2-135m.yaml", 1e-3, 4.0),
    ("configs/meft/qwen2.5-coder-0.5b.yaml", 1e-3, 0.0),
    ("configs/meft/qwen2.5-coder-0.5b.yaml", 1e-5, 0.0),
    ("configs/meft/qwen2.5-coder-0.5b.yaml", 1e-3, 4.0),
]
rows = []
for path, lr, norm in CASES:
    run = out / f"{Path(path).stem}-lr{lr:g}-norm{norm:g}"
    over = ["train.steps=12", "train.batch_size=4", "data.max_length=96", "data.eval_size=16",
            "train.warmup_steps=2", "train.on_nonfinite=stop", "train.eval_before=false", "train.num_generations=0",
            "train.threads=2", "train.report_to=[jsonl]", f"train.output_dir={run}", f"train.lr={lr}",
            f"method.input_norm={norm}", "train.eval_every=0"]
    row = {"config": path, "lr": lr, "input_norm": norm}
    if not (run / "results.json").is_file():
        try:
            api.train(C.load_config(path, over))
        except Exception as err:  # a stopped run is the finding
            row["error"] = str(err).splitlines()[0]
    log = run / "logs" / "train.jsonl"
    losses = [json.loads(l)["loss"] for l in log.read_text().splitlines() if '"loss"' in l] if log.is_file() else []
    if losses:
        row |= {"losses": [round(x, 4) for x in losses], "first3": statistics.fmean(losses[:3]),
                "last3": statistics.fmean(losses[-3:])}
    rows.append(row)
    print(json.dumps(row), flush=True)
(out / "lr.json").write_text(json.dumps(rows, indent=2))
