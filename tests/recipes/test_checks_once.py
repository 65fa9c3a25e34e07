"""Each check of a job's method and engine runs once: `slimtune train` checks that the method is a trainer and
that the launch can run it before the model loads, then hands the spec and the engine on; `slimtune plan`
checks each method once however many traces its search makes."""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter

from slimtune.cli import main
from slimtune.engines.support import require_supported
from slimtune.methods import require_trainer
from slimtune.models.families import family_config
from slimtune.recipes import train as api
from tests.recipes.test_pipeline import run_cfg

CHECKS = {require_trainer.__code__: "require_trainer", require_supported.__code__: "require_supported"}


@contextlib.contextmanager
def counted_calls():
    """Counts the calls of the two checks by their code objects (whatever name a module imported them under)."""
    seen: Counter = Counter()

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code in CHECKS:
            seen[CHECKS[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def test_train_checks_the_method_and_the_engine_once(tiny_model_dir, instr_jsonl, tmp_path):
    cfg = run_cfg(tiny_model_dir, instr_jsonl, tmp_path / "run", steps=1, eval_every=0)
    with counted_calls() as seen:
        api.train(cfg)
    assert seen == {"require_trainer": 1, "require_supported": 1}


def test_plan_checks_each_method_once_over_its_search(tmp_path, capsys):
    path = tmp_path / "config.json"
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    path.write_text(json.dumps(family_config("llama", num_hidden_layers=2, **small).to_dict()))
    argv = ["plan", "--config", str(path), "--methods", "lora,full", "--batch", "1", "--seq-len", "32"]
    with counted_calls() as seen:
        assert main([*argv, "--dtype", "fp32", "--gpu", "1GiB", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(r["largest_batch"] > 1 for r in rows)  # the search traced more than one batch size
    assert seen == {"require_trainer": 2}
