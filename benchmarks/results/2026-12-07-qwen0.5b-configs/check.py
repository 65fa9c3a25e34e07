"""Each shipped Qwen 0.5B config, at its own lr and method settings, for 8 steps of 4 rows (<= 128 tokens) on its
own task: no non-finite step (on_nonfinite: stop) and the loss falls (mean of the last 3 steps below the first 3).
Run from the repository root: .venv/bin/python benchmarks/results/2026-12-07-qwen0.5b-configs/check.py OUT"""

import json
import statistics
import sys
from pathlib import Path

from slimtune.recipes import train as api
from slimtune.training import config as C

out = Path(sys.argv[1])
rows = []
for path in sorted(Path("configs").rglob("qwen2.5-coder-0.5b.yaml")) + sorted(Path("configs").rglob("*-qwen2.5-coder-0.5b.yaml")):
    cfg = C.load_config(path)
    if cfg.method.name == "pema":
        continue
    run = out / path.parent.name / path.stem
    done = run / "results.json"
    if not done.is_file():
        over = ["train.steps=8", "train.batch_size=4", "data.max_length=128", "data.eval_size=16", "train.warmup_steps=2",
                "train.on_nonfinite=stop", "train.eval_before=false", "train.num_generations=0", "train.threads=2",
                "train.report_to=[jsonl]", f"train.output_dir={run}"]
        try:
            api.train(C.load_config(path, over))
        except Exception as err:  # a stopped run is the finding
            rows.append({"config": str(path), "error": str(err).splitlines()[0]})
            continue
    losses = [json.loads(l)["loss"] for l in (run / "logs" / "train.jsonl").read_text().splitlines() if '"loss"' in l]
    first, last = statistics.fmean(losses[:3]), statistics.fmean(losses[-3:])
    rows.append({"config": str(path), "lr": cfg.train.lr, "losses": losses, "first3": first, "last3": last, "falls": last < first})
    print(json.dumps(rows[-1]), flush=True)
(out / "check.json").write_text(json.dumps(rows, indent=2))
